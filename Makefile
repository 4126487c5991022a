# One-command entry points. Each creates .venv on first use and installs what it needs.
# torch==2.13.0 is pinned for CPU machines: pip finds the local CPU wheel, whereas an unpinned torch (or a
# package that pulls one in) would download several GB of CUDA wheels. torchvision 0.28.0 is the release
# built against torch 2.13 (timm and diffusers need it). PyPI has only its CUDA build, whose compiled ops do not
# load beside CPU torch (the CPU wheel is on download.pytorch.org, often unreachable); the start-up hook that
# `python -m erw_fast.torchvision_cpu --install` adds to the venv makes `import torchvision` (and ops.nms) work
# there, and does nothing where the compiled ops load.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erw_fast-installed

.PHONY: install test test-fast test-slow lint demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torchvision==0.28.0
	$(PY) -m pip install -q -e '.[encoders,vae,triton,plots,data,eval,tb,wandb,test]'
	# DeepSpeed builds against the torch already installed (no isolated build env that would pull CUDA torch).
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m erw_fast.torchvision_cpu --install
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# Tests. Markers (registered in pyproject.toml, --strict-markers): slow (> ~3 s on 2 CPU cores, or a real
# training run), multiprocess (spawns processes: torchrun / deepspeed launchers, python subprocesses, DataLoader or
# DALI workers), gpu (needs CUDA; skipped without it).
#   make test       the full suite (what CI runs, .ci/run), in TEST_WORKERS pytest-xdist processes (~8 min on 2
#                   cores; 13 min in one process: the launcher tests mostly wait)
#   make test-fast  ruff + everything unmarked: unit tests, golden parity, the Triton kernels in the interpreter on
#                   small shapes (~1-1.5 min on 2 cores); extra pytest arguments in PYTEST_ARGS
#   make test-slow  the rest: the marked tests only
FAST := not slow and not multiprocess and not gpu
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "$(FAST)" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "slow or multiprocess or gpu" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) train.py --config configs/demo.yaml
