"""Test-session set-up shared by the unit tests and nbval.

Notebook kernels inherit this environment, so their run outputs, and the figures notebook 04
draws, go to a throwaway folder rather than the user's runs/ and the tracked figures/: a test
run writes no tracked file.
"""
import os
import tempfile

os.environ.setdefault("SPARSECIRC_RUNS", tempfile.mkdtemp(prefix="sparsecirc-test-runs-"))
os.environ.setdefault("SPARSECIRC_FIGURES", os.path.join(os.environ["SPARSECIRC_RUNS"], "figures"))
