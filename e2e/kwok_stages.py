"""kwok's pod stages as this cluster needs them, derived from kwok's defaults.

kwok's default ``pod-complete`` stage marks every Job pod Succeeded at once: a weight loader
that never ran would look successful. Here the node agent (e2e/node_agent.py) runs the
operator's loader pods for real and reports their exit, so ``pod-complete`` is limited to
pods the operator does not manage; other Jobs (a chart's hook Job, a test's) complete as before.

A container whose configuration cannot be resolved (a missing Secret) or whose image cannot be
pulled never starts on a real node: its pod stays Pending with ``CreateContainerConfigError``,
``ErrImagePull`` or ``ImagePullBackOff``. The node agent reports that, and ``pod-ready`` must
then not flip the pod back to Running.

With ``serving=True`` (a cluster whose node agent runs the serving pods' processes,
e2e/serving_kubelet.py) the operator's thinker, talker and gateway pods are left to the node
agent as a kubelet would own them: kwok's ``pod-ready`` and ``pod-delete`` skip them, and a
stage derived from ``pod-ready``, ``pod-address``, only gives such a pod its address (what the
network plugin does when a kubelet creates the pod's sandbox): Pending, containers creating, not
Ready. Only the node agent's readiness probe then makes it Ready, so the Deployment and
StatefulSet controllers never act on a Ready that no process earned; and it deletes the pod
once its process has exited, as a kubelet does after the grace period. Without ``serving`` every
pod becomes Ready at once, as the control-plane-only tests expect.

The defaults are YAML; the standard library has no YAML parser, so each extra requirement is
inserted as text under the stage's ``matchExpressions`` (the pinned kwok's layout), and the
result is checked to contain it.
"""

from __future__ import annotations

import re

from e2e.procs import ClusterError

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
OPERATOR_NAME = "omni-operator"
SERVING_ROLES = ("thinker", "talker", "gateway")
CONFIG_ERROR = "CreateContainerConfigError"
NOT_STARTED = (CONFIG_ERROR, "ErrImagePull", "ImagePullBackOff")  # waiting reasons of a container that never starts
ADDRESS_STAGE = "pod-address"

# One value per pod, "<managed-by>/<component>", so "a serving pod of the operator" is one In or
# NotIn test (requirements are ANDed; a NotIn on each label alone would also skip other pods).
SERVING_POD_QUERY = (f'(.metadata.labels["{MANAGED_BY_LABEL}"] // "") + "/" + '
                     f'(.metadata.labels["{COMPONENT_LABEL}"] // "")')
SERVING_POD_VALUES = tuple(f"{OPERATOR_NAME}/{role}" for role in SERVING_ROLES)

# (stage name, gojq query, NotIn values). A label key with dots and a slash needs jq's
# bracket form; a query that yields nothing (no such label, no container statuses) matches NotIn.
EXTRA_REQUIREMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pod-complete", f'.metadata.labels["{MANAGED_BY_LABEL}"]', (OPERATOR_NAME,)),
    ("pod-ready", ".status.containerStatuses.[].state.waiting.reason", NOT_STARTED),
)
SERVING_REQUIREMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pod-ready", SERVING_POD_QUERY, SERVING_POD_VALUES),
    ("pod-delete", SERVING_POD_QUERY, SERVING_POD_VALUES),
)

# What pod-address writes besides the address block it takes from pod-ready's template.
_ADDRESS_STATUS = """\
      {{ $now := Now }}

      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        reason: ContainersNotReady
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        reason: ContainersNotReady
        type: ContainersReady

      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        started: false
        restartCount: 0
        state:
          waiting:
            reason: ContainerCreating
      {{ end }}
"""


def _stage_name(doc: str) -> str | None:
    m = re.search(r"^metadata:\n(?:[ \t]+.*\n)*?[ \t]+name:[ \t]*['\"]?([\w.-]+)", doc, re.M)
    return m.group(1) if m else None


def _requirement(indent: str, query: str, values: tuple[str, ...], operator: str = "NotIn") -> str:
    lines = [f"{indent}- key: '{query}'", f"{indent}  operator: '{operator}'"]
    if values:  # Exists and DoesNotExist take none
        lines += [f"{indent}  values:"] + [f"{indent}  - '{v}'" for v in values]
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


def _address_stage(pod_ready: str) -> str:
    """``pod-address`` from kwok's ``pod-ready``: the same selector plus "a serving pod of the
    operator, with no address yet", and a status template that writes pod-ready's address block
    (hostIP, podIP: kwok's own allocator) and a Pending, not-ready pod around it."""
    block = re.search(r"^[ \t]*\{\{ \$hostIPs := .*?(?=^[ \t]*phase:)", pod_ready, re.M | re.S)
    template = re.search(r"^([ \t]*)statusTemplate: \|\n", pod_ready, re.M)
    if not block or not template:
        raise ClusterError("kwok's pod-ready stage has no address block (hostIPs/podIPs) to derive pod-address from")
    doc = pod_ready[:template.end()] + _ADDRESS_STATUS + block.group(0) + "      startTime: {{ $now | Quote }}\n"
    doc = re.sub(r"^(metadata:\n(?:[ \t]+.*\n)*?[ \t]+name:[ \t]*)['\"]?pod-ready['\"]?", rf"\g<1>{ADDRESS_STAGE}",
                 doc, count=1, flags=re.M)
    doc = _add_requirement(doc, ADDRESS_STAGE, SERVING_POD_QUERY, SERVING_POD_VALUES, "In")
    return _add_requirement(doc, ADDRESS_STAGE, ".status.podIP", (), "DoesNotExist")


def derive_stages(defaults: str, *, serving: bool = False) -> str:
    """kwok's default stages (a multi-document YAML file) with ``EXTRA_REQUIREMENTS`` added,
    and with ``serving`` the serving pods left to the node agent (module docstring)."""
    docs = re.split(r"^---[ \t]*\n", defaults, flags=re.M)
    wanted: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for stage, query, values in EXTRA_REQUIREMENTS + (SERVING_REQUIREMENTS if serving else ()):
        wanted.setdefault(stage, []).append((query, values))
    seen = set()
    pod_ready = None
    for i, doc in enumerate(docs):
        name = _stage_name(doc)
        if name == "pod-ready":
            pod_ready = doc
        for query, values in wanted.get(name, ()):
            docs[i] = _add_requirement(docs[i], name, query, values)
            seen.add(name)
    if seen != set(wanted):
        raise ClusterError(f"kwok's default stages lack {', '.join(sorted(set(wanted) - seen))}")
    if serving:
        docs.append(_address_stage(pod_ready))
    return "---\n".join(docs)
