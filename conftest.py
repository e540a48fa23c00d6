"""Test-session set-up shared by the unit tests and nbval.

Notebook kernels inherit this environment, so their run outputs, and the figures notebook 04
draws, go to a throwaway folder rather than the user's runs/ and the tracked figures/: a test
run writes no tracked file.
"""
import os
import tempfile

os.environ.setdefault("SPARSECIRC_RUNS", tempfile.mkdtemp(prefix="sparsecirc-test-runs-"))
os.environ.setdefault("SPARSECIRC_FIGURES", os.path.join(os.environ["SPARSECIRC_RUNS"], "figures"))

# Under `pytest -n 2` (make test) each worker, and each notebook kernel it starts, uses one
# thread: two 2-thread PyTorch processes on two cores run 4-5x slower than one alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(1)


# make test gives each worker whole files, in collection order (--dist loadfile
# --no-loadscope-reorder): the slowest go first, so that neither worker starts notebook 03's
# fine-tuning (about 6 of the suite's 13 worker-minutes under ATEN_CPU_CAPABILITY=default) late and
# leaves the other idle. Slowest first by pytest --durations at one thread; then everything else,
# in pytest's order. Within a file the order is kept (a notebook's cells share one kernel).
SLOWEST_FIRST = ("03_sparse_post_training.ipynb", "06_three_digits.ipynb", "02_base_training.ipynb",
                 "05_circuit_size.ipynb", "07_circuit_discovery.ipynb", "04_circuit_graphs.ipynb")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
