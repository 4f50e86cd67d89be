"""Fixtures for the runtime tier: a tiny random-weight Qwen3-Omni built locally, and
real runtime processes (`omni-runtime thinker|talker|gateway`) on loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e.runtime_process import RuntimeProcess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    # torch and transformers come with the `runtime` extra (`make test` installs it): fail, never skip.
    from omni_runtime.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-omni") / "model")


@pytest.fixture
def spawn(tmp_path):
    """spawn(role, **env) -> RuntimeProcess; every process is stopped at the end of the test."""
    procs: list[RuntimeProcess] = []

    def _spawn(role: str, env: dict, args=(), log_name: str | None = None) -> RuntimeProcess:
        p = RuntimeProcess(role, env, tmp_path / (log_name or f"{role}-{len(procs)}.log"), args)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory):
    procs: list[RuntimeProcess] = []
    d = tmp_path_factory.mktemp("procs")

    def _spawn(role: str, env: dict, args=()) -> RuntimeProcess:
        p = RuntimeProcess(role, env, d / f"{role}-{len(procs)}.log", args)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """vLLM's CPU build (`make setup-vllm`, which `make test` runs): fail, never skip."""
    from .vllm_procs import find_vllm_venv

    return find_vllm_venv()


@pytest.fixture(scope="session")
def vllm_thinkers(tmp_path_factory, tiny_model, vllm_venv):
    """Real `omni-runtime thinker --engine vllm` launchers over `vllm serve` of the tiny model,
    shared by the session (each takes 1-3 minutes to start on 2 cores)."""
    from .vllm_procs import VllmPool

    pool = VllmPool(tmp_path_factory.mktemp("vllm"), tiny_model, vllm_venv)
    yield pool
    pool.stop_all()
