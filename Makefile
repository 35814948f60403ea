# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs, builds vlm_shapes, trains tiny SigLIP on CPU, evaluates
#   make test   the whole test suite in the same environment
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(CURDIR)/data_dir
WORKDIR ?= $(CURDIR)/workdir/siglip_tiny
DEMO_CONFIG ?= configs/siglip/tiny.py

LLAVA_WORKDIR ?= $(CURDIR)/workdir/llava_tiny
BLIP_WORKDIR ?= $(CURDIR)/workdir/blip_tiny

.PHONY: demo demo-llava demo-cot demo-blip demo-blip2 demo-fusion test test-fast install bench-loss-memory clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m vlmjax.data.build vlm_shapes --data_dir $(DATA_DIR)
	$(PY) -m vlmjax.train --config $(DEMO_CONFIG) --workdir $(WORKDIR) \
		--config.data.data_dir=$(DATA_DIR)
	$(PY) -m vlmjax.plot $(WORKDIR) > /dev/null && echo "curves: $(WORKDIR)/plots"

# The tiny LLaVA chain (SigLIP tiny -> LM tiny -> stage 1 -> shape warm-up -> stage 2), reusing complete runs;
# WORKDIR= names the chain's directory (one subdirectory per run).
demo-llava: $(VENV)/.installed
	$(PY) -m vlmjax.demos.llava --data_dir $(DATA_DIR) \
		--workdir $(if $(filter command line,$(origin WORKDIR)),$(WORKDIR),$(LLAVA_WORKDIR))

# LLaVA-CoT: the LLaVA chain (reused when complete), the CoT SFT, then benchmarks/cot_search.py
# writing WORKDIR/cot_search.json.
demo-cot: $(VENV)/.installed
	$(PY) -m vlmjax.demos.cot --data_dir $(DATA_DIR) \
		--workdir $(if $(filter command line,$(origin WORKDIR)),$(WORKDIR),$(LLAVA_WORKDIR))

# Tiny BLIP-2: the LLaVA chain's SigLIP and LM runs (reused when complete), then BLIP-2's stage 1
# (Q-Former on the frozen CNN) and stage 2 (soft prompt of the frozen LM); WORKDIR= as demo-llava.
demo-blip2: $(VENV)/.installed
	$(PY) -m vlmjax.demos.blip2 --data_dir $(DATA_DIR) \
		--workdir $(if $(filter command line,$(origin WORKDIR)),$(WORKDIR),$(LLAVA_WORKDIR))

# Flamingo-style fusion: the frozen SigLIP CNN and LM of the LLaVA chain (reused when complete),
# the mmc4 export of vlm_shapes, then the resampler + gated cross-attention; WORKDIR= as demo-llava.
demo-fusion: $(VENV)/.installed
	$(PY) -m vlmjax.demos.fusion --data_dir $(DATA_DIR) \
		--workdir $(if $(filter command line,$(origin WORKDIR)),$(WORKDIR),$(LLAVA_WORKDIR))

# Tiny BLIP (ITC + ITM on hard negatives + LM) on vlm_shapes, its CNN image tower started from a
# SigLIP tiny run; WORKDIR= names the chain's directory (WORKDIR/siglip, WORKDIR/blip).
demo-blip: $(VENV)/.installed
	$(PY) -m vlmjax.demos.blip --data_dir $(DATA_DIR) \
		--workdir $(if $(filter command line,$(origin WORKDIR)),$(WORKDIR),$(BLIP_WORKDIR))

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench-loss-memory: $(VENV)/.installed
	$(PY) benchmarks/loss_memory.py

clean-demo:
	rm -rf $(WORKDIR) $(DATA_DIR)
