"""Circuit discovery on the dense model beside the sparse model's read-off: the numbers of notebook 07.

Runs :func:`sparsecirc.discovery.discover` on the shipped 2-digit (or, with ``--digits 3``,
3-digit) base and sparse models: EAP, EAP-IG (k = 5 and 20) and ACDC (several thresholds) at
the attention-edge unit on ``--pairs`` clean/corrupted pairs, the sparse read-off, and EAP over
residual edges (TransformerLens' own ``attribution_patch`` and ``faithfulness``, which take one
pair at a time) on ``--residual-pairs`` of them. Writes ``results.json``, ``results.md`` (the
table: edges needed at 80/90/95% faithfulness, heads touched, seconds, faithfulness of the 90%
circuit with mean ablation, overlap with the read-off and the share of the read-off it keeps) and
``curves.png`` into ``--out``
(default: a new folder under ``runs/benchmarks/discovery/``). One process, 2 threads: run it
alone. About 10 minutes for 2 digits.

    python benchmarks/discovery.py [--digits 2] [--pairs 256] [--residual-pairs 16] [--out DIR]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sparsecirc import load_checkpoint, load_split
from sparsecirc.discovery import LEVELS, discover
from sparsecirc.files import write_atomically
from sparsecirc.patching import make_pairs
from sparsecirc.paths import (new_run_dir, reference_base_checkpoint_path, reference_dataset_path,
                              reference_sparse_checkpoint_path)
from sparsecirc.plots import plot_discovery_curves


def table(rows: list[dict]) -> str:
    levels = [round(level * 100) for level in LEVELS]
    lines = ["| model | method | unit | " + " | ".join(f"edges for {p}%" for p in levels)
             + " | heads | seconds | mean ablation (90% circuit) | Jaccard with read-off | share of read-off kept |",
             "|---|---|---|" + "---:|" * (len(levels) + 5)]
    for row in rows:
        needed = " | ".join("-" if row[f"edges_{p}"] is None else str(row[f"edges_{p}"]) for p in levels)
        mean = "-" if row["mean_ablation"] is None else f"{row['mean_ablation']:.2f}"
        overlap = "-" if row["jaccard_read_off"] is None else f"{row['jaccard_read_off']:.2f}"
        lines.append(f"| {row['model']} | {row['method']} | {row['unit']} | {needed} | {row['heads']} | "
                     f"{row['seconds']:.1f} | {mean} | {overlap} | {row['contains_read_off']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, choices=(2, 3), default=2)
    parser.add_argument("--pairs", type=int, default=256, help="pairs for the attention-edge methods (even)")
    parser.add_argument("--residual-pairs", type=int, default=16,
                        help="pairs for EAP over residual edges (even; 0 leaves it out)")
    parser.add_argument("--out", type=Path, help="folder for the results (default: a new one under runs/)")
    args = parser.parse_args()
    if args.pairs < 2 or args.pairs % 2 or args.residual_pairs < 0 or args.residual_pairs % 2:
        parser.error("--pairs must be even and >= 2, --residual-pairs even and >= 0")
    task = load_split(reference_dataset_path(args.digits)).task
    dense, _ = load_checkpoint(reference_base_checkpoint_path(args.digits))
    sparse, _ = load_checkpoint(reference_sparse_checkpoint_path(args.digits))
    out = args.out or new_run_dir("benchmarks/discovery")
    out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(task, args.pairs, seed=0)
    residual = make_pairs(task, args.residual_pairs, seed=0) if args.residual_pairs else None
    start = time.perf_counter()
    results = discover(dense, sparse, pairs, residual, acdc_thresholds=(0.0001, 0.0003, 0.001, 0.003, 0.01))
    rows = [r.row() for r in results]
    summary = {"digits": args.digits, "pairs": args.pairs, "residual_pairs": args.residual_pairs,
               "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1)}
    text = json.dumps({"summary": summary, "rows": rows}, indent=1)
    write_atomically(out / "results.json", lambda file: file.write(text.encode()), overwrite=True)
    write_atomically(out / "results.md", lambda file: file.write(table(rows).encode()), overwrite=True)
    plot_discovery_curves(results).savefig(out / "curves.png", dpi=110)
    print(table(rows))
    print(f"{summary['seconds']:.0f} s in all; results in {out}")


if __name__ == "__main__":
    main()
