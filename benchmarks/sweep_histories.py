"""What the histories of a sweep's runs say: which runs dipped when tau tightened, which passes broke a run.

Reads the checkpoints ``benchmarks/sparsify_seeds.py`` leaves in its ``--out`` folders (each holds
the run's history in ``extra.history``) and prints one row per run of the present recipe (runs
with any other setting are skipped and counted):

- ``at 900``: training exact match at the last evaluation before tau tightens (step 960 of 2,400,
  ``prune_at``);
- ``low before pass``: the lowest training exact match from then until the first pruning pass
  (no row when the first pass came at once, at step 1,000); a dip here is before any edge was
  closed for good, so it is the tighter tau's doing;
- ``closed``: edges the passes closed; ``low after``: the lowest exact match after the last pass,
  up to step 2,400; ``at ceiling``: steps from 960 to 2,400 with the multiplier at its ceiling;
- ``rescued``, ``edges``: rescue windows run and the selected state's open edges per input on the
  training sample; ``miss``: the run warned.

    python benchmarks/sweep_histories.py runs/benchmarks/sparsify_seeds/*/ [--json out.json]
"""

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from sparsecirc.sparsify import SparsifyConfig

# Settings added to the recipe after some sweeps were run, with the value that does what the code
# did before they existed: a checkpoint without them ran the present recipe.
ADDED_SINCE = {"rescue_passes": False}


def run_summary(history: list[dict], config: SparsifyConfig) -> dict:
    """One run's row (see the module docstring) from its ``history``."""
    evaluated = [row for row in history if "train_exact_match" in row and row["step"] <= config.steps]
    tighten = round(config.prune_at * config.steps)
    passes, closed_so_far = [], 0  # closed_edges is the running total, on every evaluation a pass may follow
    for row in evaluated:
        if row.get("closed_edges", 0) > closed_so_far:
            passes.append(row["step"])
            closed_so_far = row["closed_edges"]
    first_pass = passes[0] if passes else None
    last_pass = passes[-1] if passes else None
    before_tighten = [row for row in evaluated if row["step"] < tighten]
    between = [row["train_exact_match"] for row in evaluated
               if tighten <= row["step"] < (first_pass or config.steps + 1)]
    after = [row["train_exact_match"] for row in evaluated if last_pass is not None and row["step"] > last_pass]
    selected = history[-1]["selected_step"]
    selected_row = next(row for row in history if row["step"] == selected and "train_edges" in row)
    return {"seed": config.seed,
            "at_tighten": before_tighten[-1]["train_exact_match"] if before_tighten else None,
            "low_before_pass": min(between) if between else None,
            "first_pass": first_pass, "last_pass": last_pass,
            "closed": closed_so_far,
            "low_after_passes": min(after) if after else None,
            "steps_at_ceiling": sum(1 for row in history if tighten <= row["step"] <= config.steps
                                    and row["multiplier"] >= config.multiplier_max),
            "rescued": sum(1 for row in history if "rescue" in row),
            "edges": selected_row["train_edges"], "missed": bool(history[-1]["warnings"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="--out folders of benchmarks/sparsify_seeds.py")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    default = SparsifyConfig().to_dict()
    rows, skipped = [], 0
    for folder in args.folders:
        paths = sorted(Path(folder).glob("sparse_*.pt"))
        if not paths:
            sys.exit(f"no sparse_*.pt checkpoints in {folder}: give the --out folders of benchmarks/sparsify_seeds.py")
        for path in paths:
            extra = torch.load(path, map_location="cpu", weights_only=False)["extra"]
            settings = {**ADDED_SINCE, **extra["sparsify_config"]}
            if {k: v for k, v in settings.items() if k != "seed"} != {k: v for k, v in default.items() if k != "seed"}:
                skipped += 1
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = run_summary(extra["history"], SparsifyConfig(**settings))
            rows.append({"run": f"{Path(folder).name}/{path.stem}", **row})

    def pct(value):
        return "-" if value is None else f"{value:.2%}"

    print(f"{'run':48s} {'at 900':>8s} {'low before pass':>15s} {'first pass':>10s} {'closed':>6s} "
          f"{'low after':>9s} {'at ceiling':>10s} {'rescued':>7s} {'edges':>6s}  miss")
    for row in rows:
        print(f"{row['run']:48s} {pct(row['at_tighten']):>8s} {pct(row['low_before_pass']):>15s} "
              f"{row['first_pass'] or '-'!s:>10s} {row['closed']:6d} {pct(row['low_after_passes']):>9s} "
              f"{row['steps_at_ceiling']:10d} {row['rescued']:7d} {row['edges']:6.2f}  {'MISS' if row['missed'] else ''}")
    for label, group in (("missed", [r for r in rows if r["missed"]]), ("met the bar", [r for r in rows if not r["missed"]])):
        if not group:
            continue
        dipped = sum(1 for r in group if r["low_before_pass"] is not None and r["low_before_pass"] < 0.99)
        low_after = [r["low_after_passes"] for r in group if r["low_after_passes"] is not None]
        print(f"\n{label}: {len(group)} runs; {dipped} dipped below 99% between tau tightening and their first pass; "
              f"median closed {statistics.median(r['closed'] for r in group):.0f}; median lowest exact match after the "
              f"last pass {statistics.median(low_after):.2%}; median steps at the ceiling "
              f"{statistics.median(r['steps_at_ceiling'] for r in group):.0f}")
    print(f"\n{len(rows)} runs of the present recipe; {skipped} checkpoints with other settings skipped")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main()
