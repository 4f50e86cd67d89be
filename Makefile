# Two entry points for a fresh machine: `make demo` and `make test`.
# Everything is installed into .venv; the control-plane binaries are built once
# into $(OMNI_CACHE) (outside the repo) and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,runtime
export OMNI_CACHE ?= $(HOME)/.cache/qwen3-omni
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup binaries demo test test-fast generate clean

$(VENV)/.installed-$(subst $(comma),_,$(EXTRAS)): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

comma := ,
setup: $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

binaries:
	bash e2e/build-binaries.sh

demo: EXTRAS = test
demo: setup binaries
	$(PY) -m e2e.demo

test: setup binaries
	$(PY) -m pytest

# Pure and schema tiers only: no control plane, no torch.
test-fast: EXTRAS = test
test-fast: setup
	$(PY) -m pytest -m "not cluster and not runtime"

generate: setup
	$(VENV)/bin/omni-operator generate

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
