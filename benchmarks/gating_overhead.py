"""How much do the edge gates add to a training step?

Times the base-training step (dense attention) against the sparse post-training step (sampled
gates, straight-through gradient, expected-edge penalty) on the reference base model, batch
256, alternating rounds so that both see the same machine load. Prints medians and the ratio.

    python benchmarks/gating_overhead.py [--rounds 5] [--steps 20]
"""

import argparse
import json
import statistics
import time

import torch

from sparsecirc import load_checkpoint, load_split
from sparsecirc.paths import reference_base_checkpoint_path, reference_dataset_path
from sparsecirc.sparsify import sparsify_step
from sparsecirc.training import train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and variant")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    split = load_split(reference_dataset_path())
    task = split.task
    model, _ = load_checkpoint(reference_base_checkpoint_path())
    model.train()
    tokens, targets = task.batch(list(split.train[: args.batch_size]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)  # tiny lr: the model barely moves
    generator = torch.Generator().manual_seed(0)
    variants = {
        "dense": lambda: train_step(model, optimizer, tokens, targets, task),
        "gated": lambda: sparsify_step(model, optimizer, tokens, targets, task, 4.0, 1.0, 0.01, generator),
    }
    times = {name: [] for name in variants}
    for step in variants.values():  # warm-up
        for _ in range(3):
            step()
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    dense, gated = statistics.median(times["dense"]), statistics.median(times["gated"])
    print(json.dumps({"batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "dense_step_ms": round(1000 * dense, 1), "gated_step_ms": round(1000 * gated, 1),
                      "overhead": f"{gated / dense - 1:+.1%}"}, indent=1))


if __name__ == "__main__":
    main()
