"""Small shared helpers for the test suite (no fixtures here)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CRD_PATH = ROOT / "crds" / "omnideployment.yaml"
K8S_VERSIONS = ("1.34.0", "1.37.0")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def example(name: str = "omni.yaml") -> dict[str, Any]:
    return copy.deepcopy(load_yaml(EXAMPLES / name))


def crd_schema() -> dict[str, Any]:
    return load_yaml(CRD_PATH)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_k8s(obj: dict[str, Any]) -> None:
    """Strict validation against the real Kubernetes JSON schemas (raises on any problem)."""
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def validate_against_crd(resource: dict[str, Any]) -> None:
    """The OpenAPI v3 (draft-4 style) part of the CRD schema; CEL rules need a real apiserver."""
    import jsonschema

    jsonschema.Draft4Validator(crd_schema()).validate(resource)


class FakeClock:
    """A clock for omni_operator.controller.workqueue that moves only when a test advances it: a
    delay is released exactly when its time comes, and a test never sleeps against the wall."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._waiting: set[threading.Condition] = set()
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, condition: threading.Condition, seconds: float | None) -> None:
        with self._lock:
            self._waiting.add(condition)
        condition.wait()  # until advance() or the queue itself wakes it

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()


def watch_cache(kube, namespace: str, cache=None):
    """The operator's watch cache (OmniDeployments, their children and pods) primed from paged
    LISTs, as a new leader primes it: what the watches hold when the next reconcile runs. Given
    `cache`, that one is primed again in place (newer copies replace older ones)."""
    from omni_operator.controller.cache import ObjectCache, prime_from_api
    from omni_operator.controller.watches import MANAGED, WATCHED_CHILDREN

    cache = cache or ObjectCache(tuple(kind for kind, *_ in WATCHED_CHILDREN), pods=True)
    prime_from_api(cache, kube, "OmniDeployment", [namespace], ",".join(f"{k}={v}" for k, v in MANAGED.items()))
    return cache
