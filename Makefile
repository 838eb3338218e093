# `make demo` and `make test` are the two commands of the README. Both create .venv first (idempotent: pip runs
# only when a requirements file or pyproject.toml changed since the last install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is chosen apart from the other pins: the CPU build 2.13.0 by default; a CUDA user passes e.g.
#   make setup TORCH="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test bench clean-venv gpu-check
setup: $(STAMP)

$(STAMP): requirements/base.txt requirements/no-deps.txt requirements/lock.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) $(TORCH)
	$(PIP) -r requirements/base.txt -c requirements/lock.txt
	$(PIP) --no-deps -r requirements/no-deps.txt
	$(PIP) --no-deps -e .
	$(PY) -m colossal_shear.core.compat --report
	@touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash train.example.sh

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# On one NVIDIA GPU, with .venv set up with a CUDA torch (see README, GPU): the gpu tests and the throughput table.
gpu-check:
	PY=$(PY) bash bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
