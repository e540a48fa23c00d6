"""``python -m sparsecirc``: the headless path (generate data, train, evaluate)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path


from . import paths
from .checkpoint import load_checkpoint, save_checkpoint
from .files import check_parent_folder, check_writable
from .data import AdditionTask, load_split, make_split, save_split
from .evaluation import evaluate
from .model import ModelConfig, build_model, count_parameters
from .sparsify import SparsifyConfig, SparsifyWarning, more_steps, sparsify
from .training import TrainConfig, train


EXIT_BAD_INPUT, EXIT_MISSED_BAR, EXIT_USAGE = 2, 3, 64  # with 0 (done) and 1 (a bug); 64 is sysexits' EX_USAGE. README, "Command line"


class UsageError(Exception):
    """A command line argparse refuses (a missing or unknown flag, a value of the wrong type)."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and exit; main reports it like any other error
        raise UsageError(f"{self.prog}: {message}", self.format_usage())


def _report(message: str, kind: str, as_json: bool) -> None:
    """An error as one line on stderr and, with ``--json``, as ``{"error", "kind"}`` on stdout."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "kind": kind}))


def _json_safe(value):
    """``value`` with NaN and infinite floats as ``None``: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def _output_path(out, default_name: str, kind: str, force: bool) -> Path:
    """Where a command writes its checkpoint, checked before any work: not a directory, and not
    an existing file unless ``force``."""
    out = Path(out) if out else paths.new_run_dir(kind) / default_name
    check_parent_folder(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path such as {out / default_name}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    check_writable(out)  # before minutes of training, not after
    return out


def cmd_data(args) -> dict:
    check_writable(Path(args.out))
    task = AdditionTask(args.operand_digits, args.answer_digits)
    split = make_split(task, args.test_size, args.seed)
    out = save_split(split, args.out)
    return {"path": paths.portable(out), "task": task.name, "n_train": len(split.train), "n_test": len(split.test),
            "seed": args.seed}


def evaluation_metrics(model, split) -> dict:
    """Exact match, per-digit accuracy and loss on the held-out split and on every problem,
    with the model's own gating; for a sparse model also the open edges per input."""
    on_test = evaluate(model, split.task, split.test)
    on_all = evaluate(model, split.task, split.all)
    return {"test": on_test.summary(), "all": on_all.summary(),
            "failures_all": [list(f) for f in on_all.failures[:50]]}


def cmd_train(args) -> dict:
    split = load_split(args.data)
    config = ModelConfig(split.task.operand_digits, split.task.answer_digits, n_layers=args.n_layers,
                         n_heads=args.n_heads, d_head=args.d_head, d_model=args.d_model, d_mlp=args.d_mlp,
                         seed=args.seed)
    train_config = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
                               eval_size=args.eval_size, curve_size=args.curve_size, seed=args.seed)
    out = _output_path(args.out, f"{config.name}_base.pt", "cli_train", args.force)
    model = build_model(config)
    start = time.perf_counter()
    history = train(model, split, train_config, progress=not args.json)
    seconds = time.perf_counter() - start
    metrics = evaluation_metrics(model, split)
    metrics.update(steps=history[-1]["step"], train_seconds=round(seconds, 1), parameters=count_parameters(model))
    save_checkpoint(out, model, metrics=metrics, replace_hint="--force", extra={"train_config": train_config.to_dict(),
                                                        "history": history, "data_seed": split.seed},
                    overwrite=args.force)
    return {"checkpoint": paths.portable(out), "config": config.name, **metrics}


def _load_matching(checkpoint_path, data_path):
    """The checkpoint's model and the split to use with it: ``data_path``, or with none the
    shipped split of the checkpoint's own task."""
    model, checkpoint = load_checkpoint(checkpoint_path)
    task = checkpoint.config.task
    if data_path is None:
        if task.operand_digits not in paths.SHIPPED_OPERAND_DIGITS:
            raise ValueError(f"{checkpoint_path} is for {task.name} and no split of it is shipped (only for "
                             f"operand digits {paths.SHIPPED_OPERAND_DIGITS}); pass --data with a split of {task.name}")
        data_path = paths.reference_dataset_path(task.operand_digits)
    split = load_split(data_path)
    if split.task != task:
        raise ValueError(f"checkpoint is for {task.name} but the data is {split.task.name}; pass --data with a split "
                         f"of {task.name}")
    return model, checkpoint, split


def cmd_sparsify(args) -> dict:
    model, base, split = _load_matching(args.base, args.data)
    if base.config.is_sparse:
        raise ValueError(f"{args.base} is already a sparse checkpoint; start from a dense base model")
    config = SparsifyConfig(gate_bias=args.gate_bias, lr=args.lr, steps=args.steps, early_slack=args.early_slack,
                            slack=args.slack, final_slack=args.final_slack, weight_decay=args.weight_decay,
                            prune_at=args.prune_at, eval_size=args.eval_size, edge_budget=args.edge_budget,
                            rescue_windows=args.rescue_windows, rescue_lr_scale=args.rescue_lr_scale,
                            rescue_slack=args.rescue_slack, seed=args.seed)
    sparse_config = base.config.sparse(config.gate_bias)
    out = _output_path(args.out, f"{sparse_config.name}.pt", "cli_sparsify", args.force)
    start = time.perf_counter()
    with warnings.catch_warnings():  # reported below, in the result and on stderr
        warnings.simplefilter("ignore", SparsifyWarning)
        history = sparsify(model, split, config, progress=not args.json)
    seconds = time.perf_counter() - start
    metrics = evaluation_metrics(model, split)  # sparsify left a sparse model, gated at config.gate_bias
    rescues = [row["rescue"] for row in history if "rescue" in row]
    metrics.update(steps=history[-1]["step"], rescue_windows_run=len(rescues), rescued_from=rescues,
                   rescue_restarted_from=[row["restarted_from"] for row in history if "restarted_from" in row],
                   sparsify_seconds=round(seconds, 1), tau_start=history[0]["tau"],
                   tau_final=history[-1]["tau"], selected_step=history[-1]["selected_step"],
                   warnings=history[-1]["warnings"] + all_problems_warning(metrics, config.steps))
    save_checkpoint(out, model, metrics=metrics, overwrite=args.force, replace_hint="--force",
                    extra={"sparsify_config": config.to_dict(), "history": history, "base": paths.portable(args.base)})
    return {"checkpoint": paths.portable(out), "config": sparse_config.name, **metrics}


ALL_PROBLEMS_BAR = 0.999  # every run must reach it on all problems (the selection bar is on the training sample)


def all_problems_warning(metrics: dict, steps: int) -> list[str]:
    """A warning if the chosen state of a run of ``steps`` answers fewer than ``ALL_PROBLEMS_BAR`` of
    all problems right."""
    exact = metrics["all"]["exact_match"]
    if exact >= ALL_PROBLEMS_BAR:
        return []
    return [f"the chosen state answers {exact:.2%} of all {metrics['all']['n']:,} problems right, below the bar of "
            f"{ALL_PROBLEMS_BAR:.1%}. Try another --seed or a longer run (for example --steps {more_steps(steps)}, up "
            f"from {steps})."]


def cmd_evaluate(args) -> dict:
    model, checkpoint, split = _load_matching(args.checkpoint, args.data)
    return {"checkpoint": paths.portable(args.checkpoint), "config": checkpoint.config.name, "kind": checkpoint.kind,
            **evaluation_metrics(model, split)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sparsecirc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="generate every problem and a seeded train/test split (JSON)")
    p.add_argument("--operand-digits", type=int, default=2)
    p.add_argument("--answer-digits", type=int, default=5)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write (an existing different file is never replaced)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("train", help="train a base model and save a checkpoint with its metrics")
    p.add_argument("--data", default=str(paths.reference_dataset_path()), help="split JSON (default: the shipped one)")
    p.add_argument("--out", help="checkpoint path (default: a new folder under runs/cli_train/)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    defaults, train_defaults = ModelConfig(), TrainConfig()
    for name in ("n_layers", "n_heads", "d_head", "d_model", "d_mlp", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=train_defaults.lr)
    p.add_argument("--batch-size", type=int, default=train_defaults.batch_size)
    p.add_argument("--max-steps", type=int, default=train_defaults.max_steps)
    p.add_argument("--eval-size", type=int, default=train_defaults.eval_size,
                   help="training problems the stopping rule is checked on, a fixed seeded sample (the whole "
                        "split if it is no larger), once the curve's sample meets the target; everything is "
                        "evaluated once at the end")
    p.add_argument("--curve-size", type=int, default=train_defaults.curve_size,
                   help="training and held-out problems evaluated every 50 steps for the learning curve")
    p.add_argument("--json", action="store_true", help="print metrics as JSON (no progress bar)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("sparsify", help="sparse attention post-training of a base checkpoint")
    p.add_argument("--base", default=str(paths.reference_base_checkpoint_path()), help="dense base checkpoint")
    p.add_argument("--data", help="split JSON (default: the shipped split of the base checkpoint's task)")
    p.add_argument("--out", help="checkpoint path (default: a new folder under runs/cli_sparsify/)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    sparsify_defaults = SparsifyConfig()
    p.add_argument("--gate-bias", type=float, default=sparsify_defaults.gate_bias)
    p.add_argument("--lr", type=float, default=sparsify_defaults.lr)
    p.add_argument("--steps", type=int, default=sparsify_defaults.steps)
    p.add_argument("--early-slack", type=float, default=sparsify_defaults.early_slack,
                   help="tau = base training loss + early slack until --prune-at")
    p.add_argument("--slack", type=float, default=sparsify_defaults.slack,
                   help="tau = base training loss + slack from --prune-at on")
    p.add_argument("--final-slack", type=float, default=sparsify_defaults.final_slack,
                   help="slack that tau tightens to over the final window")
    p.add_argument("--weight-decay", type=float, default=sparsify_defaults.weight_decay,
                   help="AdamW weight decay: keeps gate logits where the penalty still reaches them")
    p.add_argument("--prune-at", type=float, default=sparsify_defaults.prune_at,
                   help="fraction of the steps from which duplicate edges (a second head on the same "
                        "query and key) are closed for good; 0 turns it off")
    p.add_argument("--eval-size", type=int, default=sparsify_defaults.eval_size,
                   help="training problems the selection and the pruning passes evaluate, a fixed seeded sample "
                        "(the whole split if it is no larger)")
    p.add_argument("--edge-budget", type=float, default=sparsify_defaults.edge_budget,
                   help="open edges per input above which the run warns (default 10, the 2-digit bar)")
    p.add_argument("--rescue-windows", type=int, default=sparsify_defaults.rescue_windows,
                   help="a run that misses its bar at the last step goes on for up to this many more final windows "
                        "(0: it ends there); it stops at the first that ends with its bar met")
    p.add_argument("--rescue-lr-scale", type=float, default=sparsify_defaults.rescue_lr_scale,
                   help="a rescue window's learning rate starts at this fraction of --lr and decays as the final "
                        "window's does")
    p.add_argument("--rescue-slack", type=float, default=sparsify_defaults.rescue_slack,
                   help="slack of tau over the base loss throughout the rescue windows")
    p.add_argument("--seed", type=int, default=sparsify_defaults.seed)
    p.add_argument("--strict", action="store_true", help="exit with code 3 when the run misses its bar (a warning)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON (no progress bar)")
    p.set_defaults(run=cmd_sparsify)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (dense or sparse) on the held-out split and on all problems")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="split JSON (default: the shipped split of the checkpoint's task)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(run=cmd_evaluate)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: a half-written file's cleanup runs


def _asks_for_json(argv) -> bool:
    """Whether ``argv`` has ``--json`` (or an abbreviation argparse would take), parsed or not."""
    return any(arg.startswith("--j") and "--json".startswith(arg) for arg in argv)


def main(argv=None) -> int:
    """Run one command; the exit code is 0 (done), ``EXIT_USAGE`` (a command line argparse refuses),
    ``EXIT_BAD_INPUT`` (refused input, or a file that cannot be read or written), ``EXIT_MISSED_BAR``
    (``--strict`` and the run missed its bar) or, for a bug, the traceback's 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(err.usage, end="", file=sys.stderr)
        _report(str(err), "usage", _asks_for_json(argv))
        return EXIT_USAGE
    on_main_thread = threading.current_thread() is threading.main_thread()  # signals are only set there
    previous = signal.getsignal(signal.SIGTERM)
    if on_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        result = args.run(args)
    except ValueError as err:
        _report(str(err), "input", args.json)
        return EXIT_BAD_INPUT
    except OSError as err:  # FileExistsError, FileNotFoundError, PermissionError, a full disk, ...
        _report(str(err), "file", args.json)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug: the traceback follows, and a --json reader still gets an object
        if args.json:
            print(json.dumps({"error": f"{type(err).__name__}: {err}", "kind": "internal"}))
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    _print(result if args.json else {k: v for k, v in result.items() if k != "warnings"}, args.json)
    for message in result.get("warnings", []):
        print(f"warning: {message}", file=sys.stderr)
    if result.get("warnings") and getattr(args, "strict", False):
        return EXIT_MISSED_BAR
    return 0
