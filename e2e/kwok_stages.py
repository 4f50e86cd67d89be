"""kwok's pod stages as this cluster needs them, derived from kwok's defaults.

kwok's default ``pod-complete`` stage marks every Job pod Succeeded at once: a weight loader
that never ran would look successful. Here the node agent (e2e/node_agent.py) runs the
operator's loader pods for real and reports their exit, so ``pod-complete`` is limited to
pods the operator does not manage; other Jobs (a chart's hook Job, a test's) complete as before.

A container whose configuration cannot be resolved (a missing Secret) or whose image cannot be
pulled never starts on a real node: its pod stays Pending with ``CreateContainerConfigError``,
``ErrImagePull`` or ``ImagePullBackOff``. The node agent reports that, and ``pod-ready`` must
then not flip the pod back to Running.

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

# (stage name, gojq query, NotIn values). A label key with dots and a slash needs jq's
# bracket form; a query that yields nothing (no such label, no container statuses) matches NotIn.
EXTRA_REQUIREMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pod-complete", f'.metadata.labels["{MANAGED_BY_LABEL}"]', (OPERATOR_NAME,)),
    ("pod-ready", ".status.containerStatuses.[].state.waiting.reason", NOT_STARTED),
)


def _stage_name(doc: str) -> str | None:
    m = re.search(r"^metadata:\n(?:[ \t]+.*\n)*?[ \t]+name:[ \t]*['\"]?([\w.-]+)", doc, re.M)
    return m.group(1) if m else None


def _requirement(indent: str, query: str, values: tuple[str, ...]) -> str:
    lines = [f"{indent}- key: '{query}'", f"{indent}  operator: 'NotIn'", f"{indent}  values:"]
    lines += [f"{indent}  - '{v}'" for v in values]
    return "\n".join(lines) + "\n"


def _add_requirement(doc: str, stage: str, query: str, values: tuple[str, ...]) -> str:
    m = re.search(r"^([ \t]*)matchExpressions:[ \t]*\n([ \t]*)- ", doc, re.M)
    if not m:
        raise ClusterError(f"kwok stage {stage} has no selector.matchExpressions list to extend")
    at = m.start(2)
    out = doc[:at] + _requirement(m.group(2), query, values) + doc[at:]
    if f"- key: '{query}'" not in out:
        raise ClusterError(f"could not restrict kwok stage {stage}")
    return out


def derive_stages(defaults: str) -> str:
    """kwok's default stages (a multi-document YAML file) with ``EXTRA_REQUIREMENTS`` added."""
    docs = re.split(r"^---[ \t]*\n", defaults, flags=re.M)
    wanted = {stage: (query, values) for stage, query, values in EXTRA_REQUIREMENTS}
    seen = set()
    for i, doc in enumerate(docs):
        name = _stage_name(doc)
        if name in wanted:
            docs[i] = _add_requirement(doc, name, *wanted[name])
            seen.add(name)
    if seen != set(wanted):
        raise ClusterError(f"kwok's default stages lack {', '.join(sorted(set(wanted) - seen))}")
    return "---\n".join(docs)
