"""How long does `evaluate` take on every 3-digit problem (1,000,000)?

Times `sparsecirc.evaluate` on all problems of `AdditionTask(3, 5)` with a default-size model
(dense, and gated as a sparse model is), for a few batch sizes. The weights do not change the
cost, so a freshly built model stands in for a trained one; a checkpoint can be given instead.
Run it alone: another heavy process on the same cores doubles the times.

    python benchmarks/evaluate_speed.py [--checkpoint data/reference/add_d3_l4_h4_base.pt] [--batch-sizes 2500 10000]
                                        [--gated] [--whole]

``--whole`` times the whole forward pass instead of the shared-prefix run that ``evaluate``
uses when no user hook is attached (``GatedTransformer.run_shared_prefix``).
"""

import argparse
import json
import time

import torch

from sparsecirc.transformer import GatedTransformer
from sparsecirc import AdditionTask, ModelConfig, build_model, evaluate, load_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a 3-digit checkpoint (default: a fresh default-size model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2500, 10000])
    parser.add_argument("--gated", action="store_true", help="also time deterministic gates at bias 3")
    parser.add_argument("--whole", action="store_true", help="run the whole forward pass, not the shared prefixes")
    args = parser.parse_args()
    if args.whole:
        GatedTransformer.has_user_hooks = lambda model: True  # evaluate then runs the model whole

    task = AdditionTask(3, 5)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        model = build_model(ModelConfig(3, 5))
    operands = torch.cartesian_prod(torch.arange(1000), torch.arange(1000))  # [1_000_000, 2]
    rows = []
    for batch_size in args.batch_sizes:
        for gate_bias in ([None, 3.0] if args.gated else [None]):
            start = time.perf_counter()
            result = evaluate(model, task, operands, batch_size=batch_size, gate_bias=gate_bias)
            seconds = time.perf_counter() - start
            rows.append({"batch_size": batch_size, "gate_bias": gate_bias, "seconds": round(seconds, 1),
                         "exact_match": result.exact_match, "threads": torch.get_num_threads(),
                         "path": "whole" if args.whole else "shared prefix"})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
