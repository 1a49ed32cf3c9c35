# Quickstart:  make demo   (train FFJORD + RNODE on 8gaussians for 60 training seconds)
#              make test   (run the test suite)
# Both create the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
# Cluster users with CUDA: make venv TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast test-slow test-slurm lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build here.
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) experiments/train.py --config configs/ffjord/toy_budget.yaml run.dir=runs/demo_ffjord_8gaussians $(ARGS)

test: venv
	$(PY) -m pytest -q -m "not slurm and not paper" tests $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slurm and not slow and not paper" tests $(ARGS)

test-slurm: venv
	bash slurm/local/up.sh
	$(PY) -m pytest -q -m slurm tests $(ARGS); rc=$$?; bash slurm/local/down.sh; exit $$rc

lint: venv
	$(VENV)/bin/ruff check cnf experiments tests
	$(VENV)/bin/ruff format --check cnf experiments tests

bench: venv
	$(PY) experiments/bench_ffjord.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
