"""Test-session set-up shared by the unit tests and nbval.

Notebook kernels inherit this environment, so their run outputs go to a throwaway folder
rather than the user's runs/.
"""
import os
import tempfile

os.environ.setdefault("SPARSECIRC_RUNS", tempfile.mkdtemp(prefix="sparsecirc-test-runs-"))
