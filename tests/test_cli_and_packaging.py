import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sparsecirc import ModelConfig, build_model, evaluate, load_checkpoint, load_split, save_checkpoint
from sparsecirc.cli import _print, all_problems_warning, main

ROOT = Path(__file__).resolve().parent.parent


def test_cli_data_train_evaluate_tiny(tmp_path, capsys):
    data = tmp_path / "d.json"
    assert main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_train"] == 80
    ckpt = tmp_path / "m.pt"
    args = ["train", "--data", str(data), "--out", str(ckpt), "--n-layers", "1", "--n-heads", "2", "--d-head", "4",
            "--d-model", "8", "--d-mlp", "16", "--max-steps", "20", "--json"]
    assert main(args) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 20
    saved, _ = load_checkpoint(ckpt)  # what the CLI reports is what the saved model does
    split = load_split(data)
    assert evaluate(saved, split.task, split.all).summary() == trained["all"]
    assert main(args) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--data", str(data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["all"] == trained["all"]


def test_cli_reports_task_mismatch(tmp_path, capsys):
    from sparsecirc.paths import reference_base_checkpoint_path

    data = tmp_path / "d.json"
    main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(data)])
    assert main(["evaluate", str(reference_base_checkpoint_path()), "--data", str(data)]) == 2
    assert "checkpoint is for add_d2_a5 but the data is add_d1_a2; pass --data with a split of add_d2_a5" \
        in capsys.readouterr().err


def _tiny_checkpoint(tmp_path, operand_digits: int) -> Path:
    config = ModelConfig(operand_digits, 5, n_layers=1, n_heads=2, d_head=4, d_model=8, d_mlp=16)
    return save_checkpoint(tmp_path / f"d{operand_digits}.pt", build_model(config))


@pytest.mark.parametrize("command", ["evaluate", "sparsify"])
def test_cli_without_data_uses_the_shipped_split_of_the_checkpoints_own_task(tmp_path, capsys, monkeypatch, command):
    from sparsecirc import cli, paths

    read = []

    def stop_once_chosen(path):  # reading the 3-digit split and evaluating 10**6 problems is not the point here
        read.append(Path(path))
        raise ValueError("stopped")

    monkeypatch.setattr(cli, "load_split", stop_once_chosen)
    for digits in (2, 3, 4):
        checkpoint = str(_tiny_checkpoint(tmp_path, digits))
        assert main(["evaluate", checkpoint] if command == "evaluate" else ["sparsify", "--base", checkpoint]) == 2
    assert read == [paths.reference_dataset_path(2), paths.reference_dataset_path(3)]
    assert "d4.pt is for add_d4_a5 and no split of it is shipped" in capsys.readouterr().err


@pytest.mark.parametrize("args, kind, message", [
    (["train", "--lr", "abc"], "usage", "python -m sparsecirc train: argument --lr: invalid float value: 'abc'"),
    (["evaluate"], "usage", "python -m sparsecirc evaluate: the following arguments are required: checkpoint"),
    (["evaluate", "{tmp}/missing.pt"], "file", "no checkpoint at {tmp}/missing.pt"),
    (["evaluate", "{d3}", "--data", "data/add_d2_a5.json"], "input",
     "checkpoint is for add_d3_a5 but the data is add_d2_a5; pass --data with a split of add_d3_a5"),
])
def test_cli_errors_are_one_line_on_stderr_and_with_json_an_object_on_stdout(tmp_path, capsys, monkeypatch, args,
                                                                           kind, message):
    monkeypatch.chdir(ROOT)
    fill = {"tmp": str(tmp_path), "d3": str(_tiny_checkpoint(tmp_path, 3))}
    args, message = [a.format(**fill) for a in args], message.format(**fill)
    code = 64 if kind == "usage" else 2  # a command line argparse refuses, or a refusal at run time: distinct codes
    assert main(args) == code
    out = capsys.readouterr()
    assert out.out == "" and f"error: {message}" in out.err.splitlines()
    assert main(args + ["--json"]) == code
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": message, "kind": kind} and f"error: {message}" in out.err.splitlines()


def test_cli_bug_with_json_is_an_object_and_still_a_traceback(tmp_path, capsys, monkeypatch):
    from sparsecirc import cli

    monkeypatch.setattr(cli, "evaluation_metrics", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["evaluate", str(_tiny_checkpoint(tmp_path, 2)), "--json"])
    assert json.loads(capsys.readouterr().out) == {"error": "ZeroDivisionError: division by zero", "kind": "internal"}


def test_cli_output_names_no_folder_of_this_machine(tmp_path, capsys, monkeypatch):
    from sparsecirc import paths

    data = _tiny_data(tmp_path)
    checkpoint = save_checkpoint(tmp_path / "runs" / "m.pt", build_model(ModelConfig(1, 2, n_layers=1, n_heads=2,
                                                                                     d_head=4, d_model=8, d_mlp=16)))
    capsys.readouterr()
    monkeypatch.chdir(ROOT)  # a folder outside the checkout and the current folder: as the caller named it
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(checkpoint)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "runs/m.pt"
    assert paths.portable(paths.reference_base_checkpoint_path()) == "data/reference/add_d2_l4_h4_base.pt"


def test_module_entry_point_runs_and_import_stays_light():
    """``python -m sparsecirc`` runs; ``import sparsecirc`` and ``build_model`` stay quick (what
    ``python -m sparsecirc train`` waits for): matplotlib, ipywidgets and TransformerLens' bridge
    load on first use, and every public name still resolves. One process for all of it."""
    script = ("import runpy, sys, sparsecirc; sparsecirc.build_model(sparsecirc.ModelConfig()); "
              "print(sorted(m for m in ('matplotlib', 'ipywidgets', 'transformer_lens.model_bridge') if m in sys.modules)); "
              "print(all(getattr(sparsecirc, name) is not None for name in sparsecirc.__all__)); "
              "print('matplotlib' in sys.modules, flush=True); "
              "sys.argv = ['sparsecirc', '--help']; runpy.run_module('sparsecirc', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[]", "True", "True"], out
    assert "evaluate" in "\n".join(out[3:])


def _names(requirements):
    return {re.split(r"[<>=!~\[ ]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def _env_yml_pip_lines():
    lines, inside = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            inside = True
        elif inside and line.strip().startswith("- "):
            lines.append(line.strip()[2:])
    return [l for l in lines if not l.startswith("-")]


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    conda = _env_yml_pip_lines()
    assert sorted(conda) == sorted(declared)  # same names and the same version ranges
    assert _names(conda) == _names(declared)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in readme


def test_the_slowest_first_order_names_only_notebooks_that_exist():
    """make run and make test start notebooks in this order; a stale name would be skipped silently."""
    listed = (ROOT / "tests" / "notebooks_slowest_first.txt").read_text().splitlines()
    names = [line.strip() for line in listed if line.strip() and not line.startswith("#")]
    assert names and len(set(names)) == len(names)
    assert [name for name in names if not (ROOT / "notebooks" / name).is_file()] == []


def test_a_chosen_state_below_the_bar_on_all_problems_warns_with_a_step_count_to_try():
    """sparsify's own bar is on its training sample; the CLI adds one on all problems. Below it, the
    warning names what happened and a concrete longer run, as missed_bar's does."""
    assert all_problems_warning({"all": {"exact_match": 0.999, "n": 10_000}}, 2400) == []
    (message,) = all_problems_warning({"all": {"exact_match": 0.9985, "n": 10_000}}, 2400)
    assert "99.85% of all 10,000 problems" in message and "99.9%" in message
    assert "--steps 3000, up from 2400" in message


def test_cli_sparsify_then_evaluate_reports_edges(tmp_path, capsys):
    data = tmp_path / "d.json"
    main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(data)])
    base = tmp_path / "base.pt"
    main(["train", "--data", str(data), "--out", str(base), "--n-layers", "1", "--n-heads", "2", "--d-head", "4",
          "--d-model", "8", "--d-mlp", "16", "--max-steps", "20", "--json"])
    capsys.readouterr()
    sparse = tmp_path / "sparse.pt"
    assert main(["sparsify", "--base", str(base), "--data", str(data), "--out", str(sparse), "--steps", "300", "--json"]) == 0
    out = capsys.readouterr()
    made = json.loads(out.out)
    assert made["config"].endswith("_sparse") and "mean_open_edges" in made["all"]
    assert isinstance(made["warnings"], list) and all(f"warning: {w}" in out.err for w in made["warnings"])
    strict = ["sparsify", "--base", str(base), "--data", str(data), "--steps", "10", "--json", "--strict",
              "--edge-budget", "0.001", "--out", str(tmp_path / "strict.pt")]
    assert main(strict) == 3  # far above an edge budget of 0.001: the run says so, and --strict fails it
    out = capsys.readouterr()
    assert any("above the budget" in w for w in json.loads(out.out)["warnings"]) and "warning:" in out.err
    assert main(["evaluate", str(sparse), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all"] == made["all"]
    assert main(["sparsify", "--base", str(sparse), "--data", str(data), "--out", str(tmp_path / "x.pt")]) == 2
    assert "already a sparse checkpoint" in capsys.readouterr().err


def _tiny_data(tmp_path) -> Path:
    data = tmp_path / "d.json"
    assert main(["data", "--operand-digits", "1", "--answer-digits", "2", "--test-size", "20", "--out", str(data)]) == 0
    return data


TINY_TRAIN = ["--n-layers", "1", "--n-heads", "2", "--d-head", "4", "--d-model", "8", "--d-mlp", "16"]


@pytest.mark.parametrize("args, message", [
    (["train", "--lr", "inf"], "lr must be a finite"),
    (["train", "--lr", "nan"], "lr must be a finite"),
    (["data", "--operand-digits", "4", "--answer-digits", "5"], "more than the 1,000,000"),
])
def test_cli_refuses_settings_it_cannot_use_before_any_work(tmp_path, capsys, args, message):
    data = _tiny_data(tmp_path)
    capsys.readouterr()
    extra = ["--data", str(data), "--out", str(tmp_path / "m.pt"), *TINY_TRAIN] if args[0] == "train" else \
        ["--out", str(tmp_path / "big.json")]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]  # nothing written


def test_cli_refuses_directories_and_binary_files_by_name(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["train", "--data", str(data), "--out", str(folder), "--force", *TINY_TRAIN]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["train", "--data", str(folder), *TINY_TRAIN]) == 2
    assert "is a directory" in capsys.readouterr().err
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)))
    assert main(["train", "--data", str(binary), *TINY_TRAIN]) == 2
    assert str(binary) in capsys.readouterr().err


def test_cli_sparsify_refuses_a_non_finite_slack_and_prints_valid_json(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    capsys.readouterr()
    base = tmp_path / "base.pt"
    assert main(["train", "--data", str(data), "--out", str(base), *TINY_TRAIN, "--max-steps", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 5
    _print({"loss": float("nan"), "rows": [float("inf"), 1.0]}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"loss": None, "rows": [None, 1.0]}  # JSON has no NaN
    assert main(["sparsify", "--base", str(base), "--data", str(data), "--slack", "nan", "--out", str(tmp_path / "s.pt")]) == 2
    assert "finite" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()


def test_cli_refuses_an_output_path_through_a_file_before_training(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    (tmp_path / "somefile").write_text("mine")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "somefile" / "m.pt"), *TINY_TRAIN]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["data", "--operand-digits", "1", "--answer-digits", "2", "--out", str(tmp_path / "somefile" / "d.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "somefile").read_text() == "mine"


@pytest.mark.slow
def test_cli_three_digits_end_to_end_with_sampled_evaluation(tmp_path, capsys):
    """A tiny 3-digit run through the CLI: a compact split file, training and sparsification that
    evaluate a sample of 200 problems during the run, and all 1,000,000 problems at the end."""
    data = tmp_path / "d3.json"
    assert main(["data", "--operand-digits", "3", "--answer-digits", "5", "--test-size", "1000", "--out", str(data)]) == 0
    assert data.stat().st_size < 20_000
    capsys.readouterr()
    base, sparse = tmp_path / "base.pt", tmp_path / "sparse.pt"
    assert main(["train", "--data", str(data), "--out", str(base), *TINY_TRAIN, "--max-steps", "20",
                 "--eval-size", "200", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["all"]["n"] == 1_000_000 and trained["test"]["n"] == 1000 and trained["steps"] == 20
    assert main(["sparsify", "--base", str(base), "--data", str(data), "--out", str(sparse), "--steps", "10",
                 "--eval-size", "200", "--rescue-lr-scale", "0.5", "--rescue-slack", "0.02", "--json"]) == 0
    sparsified = json.loads(capsys.readouterr().out)
    assert sparsified["all"]["n"] == 1_000_000 and sparsified["all"]["mean_open_edges"] is not None
    from sparsecirc import load_checkpoint

    extra = load_checkpoint(sparse)[1].extra
    assert extra["sparsify_config"]["rescue_lr_scale"] == 0.5 and extra["sparsify_config"]["rescue_slack"] == 0.02
    history = extra["history"]
    assert history[-1]["step"] == sparsified["steps"] and "train_exact_match" in history[-1]
    # a 20-step base model misses the bar: four rescue windows of 2 steps each (the final window, 20% of 10 steps)
    assert sparsified["steps"] == 18 and sparsified["rescue_windows_run"] == 4 and sparsified["warnings"]
    assert len(sparsified["rescued_from"]) == 4 and all(sparsified["rescued_from"])
    restarts = [row["restarted_from"] for row in history if "restarted_from" in row]  # windows that began at the
    assert sparsified["rescue_restarted_from"] == restarts and all(step < 18 for step in restarts)  # selected state


def test_a_sampled_four_digit_split_trains_through_the_cli(tmp_path, capsys):
    """Four digits cannot be enumerated (`data` refuses them), but a sampled split works."""
    import random

    from sparsecirc import AdditionSplit, AdditionTask, save_split

    task, rng = AdditionTask(4, 5), random.Random(0)
    pairs = sorted({(rng.randrange(10_000), rng.randrange(10_000)) for _ in range(300)})
    data = save_split(AdditionSplit(task, tuple(pairs[:250]), tuple(pairs[250:]), seed=0), tmp_path / "d4.json")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), *TINY_TRAIN, "--max-steps", "5",
                 "--eval-size", "50", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["all"]["n"] == len(pairs) and trained["config"] == "add_d4_l1_h2"
