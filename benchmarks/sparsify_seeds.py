"""Does the sparse post-training recipe land in the same place for every seed and thread count?

Runs the notebook's recipe, ``python -m sparsecirc sparsify --seed S --json`` with every setting
of the recipe at its default (``--base``, ``--data`` and ``--edge-budget`` name the shipped task), for each seed and each thread count, one process after another (two
PyTorch processes side by side on a 2-core CPU each run 4-5x slower, which would spoil the
timings). Each run is scored with deterministic gates on all problems by the CLI itself: the
10,000 2-digit ones, or with ``--digits 3`` the 1,000,000 3-digit ones (from the shipped 3-digit
base model and split, with the 3-digit edge budget of 20 per input).

Another float path, as a CPU without AVX-512 would take: ``ATEN_CPU_CAPABILITY=avx2 python
benchmarks/sparsify_seeds.py ...`` (each row records its path beside its thread count).

Writes ``results.json`` and ``results.md`` (a Markdown table: seed, threads, edges per input
mean / min / max / per layer, exact match, selected step, seconds, the run's own warning) into ``--out`` (default: a
new folder under ``runs/benchmarks/sparsify_seeds/``) and prints the table. A benchmark, not a
test: about 3 minutes a run for 2 digits on 2 cores, about 6 for 3 digits (which also scores the
1,000,000 problems). ``--include`` joins the rows of earlier sweeps of the same code.

    python benchmarks/sparsify_seeds.py [--digits 2] [--seeds 0 1 2 3 4] [--threads 1 2] [--out DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsecirc.files import write_atomically
from sparsecirc.paths import new_run_dir, reference_base_checkpoint_path, reference_dataset_path

# The bar every run must meet on all problems, and the median the recipe must reach (issue 20),
# by operand digits: (exact match, edges per input, median edges per input; None: no target).
BARS = {2: (0.999, 10.0, 8.5), 3: (0.999, 20.0, None)}


def write_text(path, text: str) -> None:
    """Replace ``path`` (this run's own result file) in one step: never a truncated file."""
    write_atomically(path, lambda file: file.write(text.encode()), overwrite=True)


def code_version() -> str:
    """The commit the runs use (``sparsecirc``'s checkout), ``+changes`` if it has uncommitted ones."""
    import sparsecirc

    root = Path(sparsecirc.__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return (commit or "unknown") + ("+changes" if changed.strip() else "")


def float_path() -> str:
    """The kernels torch picks on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``), which
    ``ATEN_CPU_CAPABILITY`` can lower; the runs inherit it. Another path is another trajectory."""
    return torch.backends.cpu.get_cpu_capability()


def run_one(seed: int, threads: int, out: Path, digits: int = 2, code: str = "unknown") -> dict:
    """One sparsify run in its own process with ``threads`` threads; its CLI metrics plus wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    path = float_path()
    checkpoint = out / f"sparse_d{digits}_seed{seed}_threads{threads}_{path.lower()}.pt"
    command = [sys.executable, "-m", "sparsecirc", "sparsify", "--seed", str(seed), "--out", str(checkpoint),
               "--force", "--json", "--base", str(reference_base_checkpoint_path(digits)),
               "--data", str(reference_dataset_path(digits)), "--edge-budget", f"{BARS[digits][1]:g}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed}, {threads} threads failed ({done.returncode}):\n{done.stderr[-2000:]}")
    metrics = json.loads(done.stdout)
    on_all = metrics["all"]
    return {"digits": digits, "code": code, "seed": seed, "threads": threads, "float_path": path,
            "edges_mean": on_all["mean_open_edges"],
            "edges_min": on_all["open_edges_min"], "edges_max": on_all["open_edges_max"],
            "edges_per_layer": on_all["open_edges_per_layer"], "exact_match": on_all["exact_match"],
            "n_failures": on_all["n_failures"], "held_out_exact_match": metrics["test"]["exact_match"],
            "selected_step": metrics["selected_step"], "steps_run": metrics["steps"],
            "rescue_windows_run": metrics.get("rescue_windows_run", 0), "rescued_from": metrics.get("rescued_from", []),
            "rescue_restarted_from": metrics.get("rescue_restarted_from", []),
            "sparsify_seconds": metrics["sparsify_seconds"],
            "wall_seconds": round(wall, 1), "warnings": metrics.get("warnings", []), "checkpoint": str(checkpoint)}


def summarise(rows: list[dict], digits: int = 2) -> dict:
    min_exact_match, max_edges, max_median = BARS[digits]
    edges = [row["edges_mean"] for row in rows]
    return {"digits": digits, "runs": len(rows), "median_edges": statistics.median(edges), "max_edges": max(edges),
            "min_exact_match": min(row["exact_match"] for row in rows),
            "max_wall_seconds_2_threads": max((row["wall_seconds"] for row in rows if row["threads"] == 2), default=None),
            "every_run_meets_the_bar": all(row["exact_match"] >= min_exact_match and row["edges_mean"] <= max_edges
                                           for row in rows),
            "runs_with_a_warning": sum(bool(row.get("warnings")) for row in rows),
            "median_meets_the_target": None if max_median is None else statistics.median(edges) <= max_median}


def rescued(row: dict) -> str:
    n = row.get("rescue_windows_run", 0)
    restarts = row.get("rescue_restarted_from", [])
    restarted = f", restarted from step {', '.join(map(str, restarts))}" if restarts else ""
    return f" ({n} rescue window{'s' * (n > 1)}{restarted})" if n else ""


def markdown_table(rows: list[dict], summary: dict) -> str:
    digits = summary.get("digits", 2)
    min_exact_match, max_edges, max_median = BARS[digits]
    lines = [f"| seed | threads | edges per input | min | max | per layer | exact match (all {10 ** (2 * digits):,}) | selected step | steps run | s (fine-tuning / wall) | warning |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in rows:
        per_layer = " / ".join(f"{x:.2f}" for x in row["edges_per_layer"])
        path = f" ({row['float_path']})" if "float_path" in row else ""
        lines.append(f"| {row['seed']} | {row['threads']}{path} | {row['edges_mean']:.2f} | {row['edges_min']:.0f} | "
                     f"{row['edges_max']:.0f} | {per_layer} | {row['exact_match']:.2%} | {row['selected_step']} | "
                     f"{row.get('steps_run', '-')}{rescued(row)} | "
                     f"{row['sparsify_seconds']:.0f} / {row['wall_seconds']:.0f} | "
                     f"{'; '.join(row.get('warnings', [])) or 'none'} |")
    target = "" if max_median is None else f" (target <= {max_median:g})"
    lines += ["", f"Median {summary['median_edges']:.2f} edges per input{target}; "
                  f"largest {summary['max_edges']:.2f} (bar <= {max_edges:g}); lowest exact match "
                  f"{summary['min_exact_match']:.2%} (bar >= {min_exact_match:.1%}); "
                  f"{summary['runs_with_a_warning']} of {summary['runs']} runs warned."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, choices=sorted(BARS), default=2, help="operand digits of the shipped task")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="folder for the results and checkpoints (default: a new one under runs/)")
    parser.add_argument("--include", type=Path, nargs="+", default=[],
                        help="results.json files of earlier sweeps (same digits, same code) whose rows join this table")
    args = parser.parse_args()
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be positive, got {args.threads}")
    rows, code = [], code_version()
    for path in args.include:  # checked before anything is written
        try:
            earlier = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"--include {path}: not a results.json of this benchmark ({error})")
        if any(row.get("digits", 2) != args.digits for row in earlier):
            parser.error(f"{path} holds runs of another number of digits than --digits {args.digits}")
        rows += earlier
        if args.seeds and any(row.get("code") != code for row in earlier):
            parser.error(f"{path} holds runs of other code than this checkout's ({code}): a table mixes "
                         f"one recipe only")
    here = float_path()
    runs = ([(row["seed"], row["threads"], row.get("float_path")) for row in rows]
            + [(s, t, here) for s in args.seeds for t in args.threads])
    if not runs:
        parser.error("nothing to run: give --seeds, or --include earlier results")
    if len(set(runs)) < len(runs):
        parser.error("a (seed, threads, float path) run is asked for twice (in --seeds/--threads or the --include "
                     "files)")
    out = args.out or new_run_dir("benchmarks/sparsify_seeds")
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for threads in args.threads:
            rows.append(run_one(seed, threads, out, args.digits, code))
            print(f"seed {seed}, {threads} threads: {rows[-1]['edges_mean']:.2f} edges per input, "
                  f"exact match {rows[-1]['exact_match']:.2%}, {rows[-1]['wall_seconds']:.0f} s", flush=True)
            write_text(out / "results.json", json.dumps({"rows": rows, "summary": summarise(rows, args.digits)}, indent=2))
    summary = summarise(rows, args.digits)
    write_text(out / "results.json", json.dumps({"rows": rows, "summary": summary}, indent=2))
    table = markdown_table(rows, summary)
    write_text(out / "results.md", table)
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
