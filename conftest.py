"""Test-session set-up shared by the unit tests and nbval.

Notebook kernels inherit this environment, so their run outputs, and the figures notebook 04
draws, go to a throwaway folder rather than the user's runs/ and the tracked figures/: a test
run writes no tracked file.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

if "SPARSECIRC_RUNS" not in os.environ:  # pytest -n 2: the workers inherit the folder of the process that made it
    _RUNS = tempfile.mkdtemp(prefix="sparsecirc-test-runs-")
    os.environ["SPARSECIRC_RUNS"] = _RUNS
    atexit.register(shutil.rmtree, _RUNS, ignore_errors=True)  # a test run leaves nothing behind in the temp folder
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
# --no-loadscope-reorder): the slowest notebooks go first (tests/notebooks_slowest_first.txt, also
# make run's order), then everything else, in pytest's order. Within a file the order is kept (a
# notebook's cells share one kernel).
_ORDER_FILE = pathlib.Path(__file__).parent / "tests" / "notebooks_slowest_first.txt"
SLOWEST_FIRST = tuple(line.strip() for line in _ORDER_FILE.read_text().splitlines()
                      if line.strip() and not line.startswith("#"))


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
