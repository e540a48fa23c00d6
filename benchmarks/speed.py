"""Where the time goes: the steps users wait on, each against the FLOP-bound time of the same work.

In one run, on the shipped models:
- the reference: the matmul rate of the model's MLP shapes on this CPU (GFLOP/s), timed here;
- one base-training step and one sparsify step (sampled gates, the penalty, backward; batch 256);
- a deterministic evaluation of all 10,000 2-digit and (unless ``--quick``) all 1,000,000 3-digit problems;
- ``load_checkpoint`` of the shipped 2-digit sparse model;
and a torch.profiler table of the top ops of a sparsify step.

Each is printed as seconds and as a ratio to its FLOP-bound time: the matmul FLOPs the work needs
(linear layers, q.k and pattern.v; backward counted as twice the forward) divided by the
reference rate. Absolute times move by 2x on shared machines; the ratio is the figure to compare.
Run it alone: another heavy process on the same cores doubles every time.

    python benchmarks/speed.py [--quick] [--steps 30] [--json out.json] [--no-profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsecirc import AdditionTask, evaluate, load_checkpoint, load_split
from sparsecirc.files import write_atomically
from sparsecirc.paths import (reference_base_checkpoint_path, reference_dataset_path,
                              reference_sparse_checkpoint_path)
from sparsecirc.sparsify import SparsifyConfig, sparsify_step
from sparsecirc.training import train_step


def forward_flops(cfg, n_tokens: int, n_pos: int) -> float:
    """Matmul FLOPs of one forward pass over ``n_tokens`` tokens (sequences of ``n_pos``)."""
    d, d_mlp, n_layers = cfg.d_model, cfg.d_mlp, cfg.n_layers
    per_token = n_layers * (2 * 4 * d * d + 2 * 2 * d * d_mlp)  # q, k, v, o; MLP in and out
    per_token += n_layers * 2 * 2 * n_pos * d  # q.k over the keys and pattern.v (all positions, as computed)
    per_token += 2 * d * cfg.d_vocab  # unembedding
    return per_token * n_tokens


def matmul_rate(d_model: int, d_mlp: int, rows: int = 2816, repeats: int = 200) -> float:
    """FLOP/s of the MLP's pair of matmuls (``rows x d_model @ d_model x d_mlp`` and back), median of 5."""
    x, w_in, w_out = torch.randn(rows, d_model), torch.randn(d_model, d_mlp), torch.randn(d_mlp, d_model)
    flops = 2 * 2 * rows * d_model * d_mlp
    for _ in range(20):
        (x @ w_in) @ w_out
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            (x @ w_in) @ w_out
        rates.append(flops * repeats / (time.perf_counter() - start))
    return statistics.median(rates)


def time_steps(step, n: int, warmup: int = 5) -> float:
    """Median seconds of ``step()`` over ``n`` calls, in three rounds."""
    for _ in range(warmup):
        step()
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            step()
        rounds.append((time.perf_counter() - start) / n)
    return statistics.median(rounds)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (3 rounds)")
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-problem 3-digit evaluation")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    split = load_split(reference_dataset_path())
    task = split.task
    base, _ = load_checkpoint(reference_base_checkpoint_path())
    cfg = base.cfg
    rate = matmul_rate(cfg.d_model, cfg.d_mlp)
    rows = []

    def report(name, seconds, flops, note=""):
        floor = flops / rate
        rows.append({"what": name, "seconds": seconds, "flop_bound_seconds": floor, "ratio": seconds / floor,
                     "note": note})
        print(f"{name:<44} {seconds * 1000:10.1f} ms   FLOP-bound {floor * 1000:8.1f} ms   x{seconds / floor:5.1f}  {note}",
              flush=True)

    batch = SparsifyConfig.batch_size
    tokens, targets = task.batch(list(split.train[:batch]))
    step_flops = 3 * forward_flops(cfg, batch * task.seq_len, task.seq_len)

    base.train()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-7, fused=True)  # as training makes it; a tiny lr: the model barely moves
    report("base-training step (batch 256)", time_steps(lambda: train_step(base, optimizer, tokens, targets, task),
                                                        args.steps), step_flops)
    generator = torch.Generator().manual_seed(0)
    gate_bias = SparsifyConfig.gate_bias

    def one_sparsify_step():
        return sparsify_step(base, optimizer, tokens, targets, task, gate_bias, 100.0, 0.01, generator)

    report("sparsify step (batch 256, sampled gates)", time_steps(one_sparsify_step, args.steps), step_flops)
    base.eval()

    sparse, _ = load_checkpoint(reference_sparse_checkpoint_path())
    all_pairs = task.all_pairs()
    seconds, result = timed(lambda: evaluate(sparse, task, all_pairs))
    report("evaluate sparse, all 10,000 2-digit", seconds, forward_flops(cfg, len(all_pairs) * task.seq_len, task.seq_len),
           f"exact match {result.exact_match:.4%}, {result.mean_open_edges:.2f} edges")
    seconds, _ = timed(lambda: load_checkpoint(reference_sparse_checkpoint_path()))
    report("load_checkpoint (2-digit sparse)", seconds, forward_flops(cfg, 1, 1), "ratio not meaningful")
    if not args.quick:
        task3 = AdditionTask(3, 5)
        sparse3, _ = load_checkpoint(reference_sparse_checkpoint_path(3))
        operands = torch.cartesian_prod(torch.arange(1000), torch.arange(1000))
        seconds, result = timed(lambda: evaluate(sparse3, task3, operands))
        report("evaluate sparse, all 1,000,000 3-digit", seconds,
               forward_flops(sparse3.cfg, len(operands) * task3.seq_len, task3.seq_len),
               f"exact match {result.exact_match:.4%}, {result.mean_open_edges:.2f} edges")

    summary = {"threads": torch.get_num_threads(), "matmul_gflops": rate / 1e9,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    print(f"\nreference: {rate / 1e9:.0f} GFLOP/s on the MLP's matmul shapes, {torch.get_num_threads()} threads, "
          f"{summary['cpu_capability']}")

    if not args.no_profile:
        base.train()
        from torch.profiler import ProfilerActivity, profile
        n = 10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                one_sparsify_step()
        base.eval()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"\ntorch.profiler, {n} sparsify steps, top ops by self CPU time:\n{table}")
        summary["profile"] = table
    if args.json:
        text = json.dumps(summary, indent=1).encode()
        write_atomically(args.json, lambda file: file.write(text), overwrite=True)  # never a truncated file


if __name__ == "__main__":
    main()
