# Two entry points, both from a fresh clone with only Python 3.11, git and make:
#   make run   set up .venv if needed, then execute every notebook top to bottom, saving outputs
#   make test  set up .venv if needed, then run the unit tests and nbval over every notebook
#   make test-fast  the unit tests alone, for editing (about a minute)
#   make lab   set up .venv if needed, then open the notebooks in JupyterLab
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsecirc-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: run test test-fast lab setup clean-venv

setup: $(STAMP)

# The stamp is rebuilt only when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sparsecirc needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Both cores, one notebook kernel each with one thread (two 2-thread PyTorch processes on two
# cores run 4-5x slower than one alone), the slowest notebooks first. After a failure no new
# notebook starts; the one already running on the other core finishes, then make stops.
HASH := \#
SLOWEST_FIRST := $(addprefix notebooks/,$(shell sed -e 's/\r$$//' -e '/^$(HASH)/d' tests/notebooks_slowest_first.txt))
RUN_ORDER := $(filter $(NOTEBOOKS),$(SLOWEST_FIRST)) $(filter-out $(SLOWEST_FIRST),$(NOTEBOOKS))
run: $(STAMP)
	@printf '%s\n' $(RUN_ORDER) | OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 xargs -P 2 -n 1 sh -c \
		'echo "== executing $$1"; $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1800 "$$1" || { echo "== FAILED: $$1" >&2; exit 255; }' sh

# Both cores, one thread each (conftest.py). --dist loadfile keeps a notebook's cells on one worker,
# in order, as they share one kernel. (loadgroup cannot: under pytest 9 xdist's group suffix
# on node ids is lost, so a notebook's cells were scattered over both workers.)
# --no-loadscope-reorder keeps conftest.py's order, slowest files first, so the longest notebook
# starts at once instead of last.
test: $(STAMP)
	$(PY) -m pytest --nbval -n 2 --dist loadfile --no-loadscope-reorder

# While editing: the unit tests alone, without the notebooks and the whole 3-digit enumerations.
# Add --lf to run only what failed last time.
test-fast: $(STAMP)
	$(PY) -m pytest tests -n 2 -m "not slow"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
