# One-command entry points. Each creates .venv on first use and installs what it needs.
# torch==2.13.0 is pinned for CPU machines: pip finds the local CPU wheel, whereas an unpinned torch (or a
# package that pulls one in) would download several GB of CUDA wheels. torchvision 0.28.0 is the release
# built against torch 2.13 (timm and diffusers need it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erw_fast-installed

.PHONY: install test lint demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torchvision==0.28.0
	$(PY) -m pip install -q -e '.[encoders,vae,triton,plots,data,eval,test]'
	# DeepSpeed builds against the torch already installed (no isolated build env that would pull CUDA torch).
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) train.py --config configs/demo.yaml
