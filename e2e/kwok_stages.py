"""kwok's pod stages as this cluster needs them, derived from kwok's defaults.

kwok's default ``pod-complete`` stage marks every Job pod Succeeded at once: a weight loader
that never ran would look successful. Here the node agent (e2e/node_agent.py) runs the
operator's loader pods for real and reports their exit, so ``pod-complete`` is limited to
pods the operator does not manage; other Jobs (a chart's hook Job, a test's) complete as before.

A container whose configuration cannot be resolved (a missing Secret) or whose image cannot be
pulled never starts on a real node: its pod stays Pending with ``CreateContainerConfigError``,
``ErrImagePull`` or ``ImagePullBackOff``. The node agent reports that, and ``pod-ready`` must
then not flip the pod back to Running.

kwok's ``pod-ready`` gives a pod its address and marks it Running and Ready in one step. Where
the node agent runs the serving pods (thinker, talker, gateway) for real from the start
(``probe_serving_pods``), their readiness is its probes' alone: ``pod-ready`` leaves them out, and
a ``pod-started`` stage, ``pod-ready`` with Ready False, gives them their address. Otherwise each
would read Ready until the node agent's next pass, long enough for a StatefulSet, the operator and
a GitOps engine's health check to count a replica whose process has not even started.

The defaults are YAML; the standard library has no YAML parser, so each extra requirement is
inserted as text under the stage's ``matchExpressions`` (the pinned kwok's layout), and the
result is checked to contain it.
"""

from __future__ import annotations

import re

from e2e.procs import ClusterError

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "omni-operator"
CONFIG_ERROR = "CreateContainerConfigError"
NOT_STARTED = (CONFIG_ERROR, "ErrImagePull", "ImagePullBackOff")  # waiting reasons of a container that never starts

# The operator's serving pods, as "<managed-by>/<component>" (the query yields "/" for other pods).
SERVING_POD = ('(.metadata.labels["app.kubernetes.io/managed-by"] // "") + "/" + '
               '(.metadata.labels["app.kubernetes.io/component"] // "")')
SERVING_ROLES = tuple(f"{OPERATOR_NAME}/{role}" for role in ("thinker", "talker", "gateway"))

# (stage name, gojq query, NotIn values). A label key with dots and a slash needs jq's
# bracket form; a query that yields nothing (no such label, no container statuses) matches NotIn.
EXTRA_REQUIREMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pod-complete", f'.metadata.labels["{MANAGED_BY_LABEL}"]', (OPERATOR_NAME,)),
    ("pod-ready", ".status.containerStatuses.[].state.waiting.reason", NOT_STARTED),
)


def _stage_name(doc: str) -> str | None:
    m = re.search(r"^metadata:\n(?:[ \t]+.*\n)*?[ \t]+name:[ \t]*['\"]?([\w.-]+)", doc, re.M)
    return m.group(1) if m else None


def _requirement(indent: str, query: str, values: tuple[str, ...], operator: str) -> str:
    lines = [f"{indent}- key: '{query}'", f"{indent}  operator: '{operator}'", f"{indent}  values:"]
    lines += [f"{indent}  - '{v}'" for v in values]
    return "\n".join(lines) + "\n"


def _add_requirement(doc: str, stage: str, query: str, values: tuple[str, ...], operator: str = "NotIn") -> str:
    m = re.search(r"^([ \t]*)matchExpressions:[ \t]*\n([ \t]*)- ", doc, re.M)
    if not m:
        raise ClusterError(f"kwok stage {stage} has no selector.matchExpressions list to extend")
    at = m.start(2)
    out = doc[:at] + _requirement(m.group(2), query, values, operator) + doc[at:]
    if f"- key: '{query}'" not in out:
        raise ClusterError(f"could not restrict kwok stage {stage}")
    return out


def _started_stage(pod_ready: str) -> str:
    """``pod-ready`` for the serving pods only, with Ready False: their address, Running, not ready."""
    doc, renamed = re.subn(r"^([ \t]+name:[ \t]*['\"]?)pod-ready\b", r"\1pod-started", pod_ready, count=1, flags=re.M)
    doc, conditions = re.subn(r'status: "True"(\s+)type: (Ready|ContainersReady)\b', r'status: "False"\1type: \2', doc)
    head, sep, tail = doc.partition("initContainerStatuses:")
    head, containers = re.subn(r"^([ \t]+)ready: true$", r"\1ready: false", head, flags=re.M)
    if (renamed, conditions, containers, sep) != (1, 2, 1, "initContainerStatuses:"):
        raise ClusterError("kwok's pod-ready stage is not laid out as expected; cannot derive pod-started")
    return _add_requirement(head + sep + tail, "pod-started", SERVING_POD, SERVING_ROLES, "In")


def derive_stages(defaults: str, *, probe_serving_pods: bool = False) -> str:
    """kwok's default stages (a multi-document YAML file) with ``EXTRA_REQUIREMENTS`` added; with
    ``probe_serving_pods``, the serving pods' readiness is left to the node agent."""
    docs = re.split(r"^---[ \t]*\n", defaults, flags=re.M)
    wanted = {stage: (query, values) for stage, query, values in EXTRA_REQUIREMENTS}
    seen = set()
    for i, doc in enumerate(docs):
        name = _stage_name(doc)
        if name in wanted:
            docs[i] = _add_requirement(doc, name, *wanted[name])
            seen.add(name)
        if name == "pod-ready" and probe_serving_pods:
            docs.append(_started_stage(docs[i]))
            docs[i] = _add_requirement(docs[i], name, SERVING_POD, SERVING_ROLES)
    if seen != set(wanted):
        raise ClusterError(f"kwok's default stages lack {', '.join(sorted(set(wanted) - seen))}")
    return "---\n".join(docs)
