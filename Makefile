# Two entry points for a fresh machine: `make demo` and `make test`.
# Everything is installed into .venv; the control-plane binaries are built once
# into $(OMNI_CACHE) (outside the repo) and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export OMNI_CACHE ?= $(HOME)/.cache/qwen3-omni
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-runtime system-tools binaries demo test test-fast generate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# torch + transformers for the tiny-model runtime tests (pip's cache keeps the
# multi-GB torch wheel between runs on the same machine).
$(VENV)/.installed-runtime: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,runtime]'
	touch $@

setup: $(VENV)/.installed
setup-runtime: $(VENV)/.installed-runtime

binaries:
	bash e2e/build-binaries.sh

# openssl (certificates of the local control plane) and a Lua 5.1 interpreter (the Argo CD health
# check runs on gopher-lua, Lua 5.1); installed from Debian when missing and we may.
system-tools:
	@missing=""; command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v lua5.1 >/dev/null || missing="$$missing lua5.1"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

demo: setup system-tools binaries
	$(PY) -m e2e.demo

test: setup-runtime system-tools binaries
	$(PY) -m pytest

# Pure and schema tiers only: no control plane, no torch.
test-fast: setup
	$(PY) -m pytest -m "not cluster and not runtime"

generate: setup
	$(VENV)/bin/omni-operator generate

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
