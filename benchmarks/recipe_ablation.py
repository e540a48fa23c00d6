"""Does each part of the sparse recipe earn its place? Runs with one part switched off at a time.

Every variant is the default recipe (``SparsifyConfig()``) with one setting changed, run at the
same step budget (``--steps``, default 1200: half the default, the same for every variant) on the
same seeds, from the shipped 2-digit base model, 2 threads, one process after another. Each run is
scored with deterministic gates on all 10,000 problems: open edges per input and exact match.

Writes ``recipe_ablation.json``, ``recipe_ablation.md`` (one row per variant: edges and exact match,
median and range over seeds, runs that meet the bar, runs with a warning; then every run) and
``recipe_ablation.png`` into ``--out`` (default: a new folder under ``runs/benchmarks/recipe_ablation/``).
A benchmark, not a test: 9 variants x 5 seeds at about 75 s each is about an hour.

Without rescue windows by default (the ablation was first measured before they existed); with
``--rescue`` every variant keeps the recipe's rescue windows (but "no final window", which has no
window to replay and so no rescue), so ``--steps 2400 --rescue`` compares the parts within the recipe
as ``python -m sparsecirc sparsify`` runs it. A run then takes 2,400 to 4,320 steps (about 130-280 s),
so the variants no longer share one step budget.

    python benchmarks/recipe_ablation.py [--seeds 0 1 2 3 4] [--steps 1200] [--rescue] [--variants ...] [--out DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparsify_seeds import BARS  # noqa: E402 - the bars live with the seed sweep

# Each variant: the default recipe with these SparsifyConfig fields changed.
VARIANTS = {
    "the recipe": {},
    "fixed penalty weight 100 (no GECO)": {"multiplier_lr": 0.0, "multiplier_init": 100.0},
    "no weight decay": {"weight_decay": 0.0},
    "no duplicate closing": {"prune_at": 0.0},
    "no looser start": {"early_slack": 0.01},  # the default slack from the first step
    "no final window": {"decay_fraction": 0.0},
    "selection bar 99.9%": {"select_accuracy": 0.999},
    "no replay of failed problems": {"replay_size": 0},
    "passes from any state": {"prune_needs_bar": False},
}
THREADS = 2
MIN_EXACT_MATCH, MAX_EDGES, _ = BARS[2]  # the bars of issue 20, on all problems


def run_one(variant: str, seed: int, steps: int, rescue: bool = False) -> dict:
    """One run in this process: the variant's recipe, scored on all problems."""
    from sparsecirc import paths
    from sparsecirc.checkpoint import load_checkpoint
    from sparsecirc.data import load_split
    from sparsecirc.evaluation import evaluate
    from sparsecirc.sparsify import SparsifyConfig, SparsifyWarning, sparsify

    # without rescue windows unless asked: then the parts are compared at one step budget (as first measured)
    no_rescue = {} if rescue else {"rescue_windows": 0}
    config = SparsifyConfig(**{**SparsifyConfig().to_dict(), **no_rescue, **VARIANTS[variant], "steps": steps,
                               "seed": seed})
    model, _ = load_checkpoint(paths.reference_base_checkpoint_path())
    split = load_split(paths.reference_dataset_path())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsifyWarning)  # in the history
        history = sparsify(model, split, config, progress=False)
    seconds = time.perf_counter() - start
    on_all = evaluate(model, split.task, list(split.train) + list(split.test))
    return {"variant": variant, "seed": seed, "steps": steps, "rescue": rescue,
            "steps_run": history[-1]["step"], "edges_mean": on_all.mean_open_edges,
            "exact_match": on_all.exact_match, "n": on_all.n, "selected_step": history[-1]["selected_step"],
            "seconds": round(seconds, 1), "warnings": history[-1]["warnings"]}


def meets_bar(row: dict) -> bool:
    return row["exact_match"] >= MIN_EXACT_MATCH and row["edges_mean"] <= MAX_EDGES


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        edges, exact = [r["edges_mean"] for r in mine], [r["exact_match"] for r in mine]
        summary.append({"variant": variant, "runs": len(mine), "edges_median": statistics.median(edges),
                        "edges_min": min(edges), "edges_max": max(edges), "exact_match_median": statistics.median(exact),
                        "exact_match_min": min(exact), "exact_match_max": max(exact),
                        "runs_meeting_the_bar": sum(map(meets_bar, mine)),
                        "runs_with_a_warning": sum(bool(r["warnings"]) for r in mine)})
    return summary


def markdown(rows: list[dict], summary: list[dict]) -> str:
    steps, seeds = rows[0]["steps"], sorted({r["seed"] for r in rows})
    rescue = "with its rescue windows" if rows[0].get("rescue") else "without rescue windows"
    lines = [f"Each variant: the default recipe ({rescue}) with one part switched off, {steps} steps, seeds "
             f"{', '.join(map(str, seeds))}, {THREADS} threads; scored on all 10,000 problems. Bar: >= "
             f"{MIN_EXACT_MATCH:.1%} exact match and <= {MAX_EDGES:g} open edges per input.", "",
             "| variant | edges per input: median (range) | exact match: median (range) | runs at the bar | runs with a warning |",
             "|---|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['edges_median']:.2f} ({s['edges_min']:.2f}-{s['edges_max']:.2f}) | "
                     f"{s['exact_match_median']:.2%} ({s['exact_match_min']:.2%}-{s['exact_match_max']:.2%}) | "
                     f"{s['runs_meeting_the_bar']}/{s['runs']} | {s['runs_with_a_warning']}/{s['runs']} |")
    lines += ["", "| variant | seed | edges per input | exact match | selected step | steps run | s | warning |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['edges_mean']:.2f} | {r['exact_match']:.2%} | "
                     f"{r['selected_step']} | {r.get('steps_run', r['steps'])} | {r['seconds']:.0f} | "
                     f"{'; '.join(r['warnings']) or 'none'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--rescue", action="store_true",
                        help="keep the recipe's rescue windows in every variant (none for 'no final window', "
                             "which has none to replay)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--out", type=Path, help="folder for the results (default: a new one under runs/)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.one:
        if args.one[0] not in VARIANTS:
            parser.error(f"unknown variant {args.one[0]!r}; choose from {list(VARIANTS)}")
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.rescue)))
        return
    from sparsecirc.files import write_atomically
    from sparsecirc.paths import new_run_dir
    from sparsecirc.plots import plot_recipe_ablation

    out = args.out or new_run_dir("benchmarks/recipe_ablation")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            child = [sys.executable, __file__, "--one", variant, str(seed), "--steps", str(args.steps)]
            done = subprocess.run(child + (["--rescue"] if args.rescue else []), env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{variant}, seed {seed} failed ({done.returncode}):\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout))
            print(f"{variant}, seed {seed}: {rows[-1]['edges_mean']:.2f} edges, {rows[-1]['exact_match']:.2%}, "
                  f"{rows[-1]['seconds']:.0f} s", flush=True)
            write_atomically(out / "recipe_ablation.json", lambda f: f.write(json.dumps(
                {"rows": rows, "summary": summarise(rows)}, indent=2).encode()), overwrite=True)
    summary = summarise(rows)
    write_atomically(out / "recipe_ablation.md", lambda f: f.write(markdown(rows, summary).encode()), overwrite=True)
    fig = plot_recipe_ablation(rows, MAX_EDGES, MIN_EXACT_MATCH)
    fig.savefig(out / "recipe_ablation.png", dpi=110)
    print(markdown(rows, summary))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
