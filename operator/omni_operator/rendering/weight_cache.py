"""The weight cache: each revision of a hub repository is fetched once per OmniDeployment
into a PersistentVolumeClaim by a loader Job, then mounted read-only by every thinker and
talker pod. No role pod downloads anything itself.

Pure: cache keys and names, the PVC and Job, the role pods' mount, what the live objects
say about each cache (``observe``) and what the roles mount now (``decide``). The
reconciler does the reads and writes around it.

A revision change fills a new cache while the roles keep serving from the old one; the
roles roll onto the new one once it is complete, and the old one is pruned once no pod
mounts it. A loader that fails leaves the roles where they are.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from omni_operator.api.spec import CHECKPOINT_GB, OmniDeploymentSpec
from omni_operator.api.status import WeightsStatus
from omni_operator.controller.conditions import WEIGHTS_READY, condition
from omni_operator.rendering.meta import METRICS_PORT, ModelMount, RenderInput, common_labels, image_for, object_meta
from omni_operator.rendering.pods import downward_env, env_list, pool_placement, security_context
from omni_runtime.config import Env

COMPONENT = "weights"
KEY_LABEL = "omni.qwen.ai/weights-key"
REPO_ANNOTATION = "omni.qwen.ai/repo"
REVISION_ANNOTATION = "omni.qwen.ai/revision"
ROLE_MOUNT = "/models"
LOADER_MOUNT = "/weights"
# The loader renames its staging directory to this only once every file is verified.
COMPLETE_DIR = "model"
LOADER_CONTAINER = "loader"
EXIT_PERMANENT = 2  # the loader's exit code for errors a retry cannot fix (auth, not found, too small)
LOADER_BACKOFF_LIMIT = 4
# Room for the loader's partial files and metadata next to the checkpoint.
SIZE_HEADROOM = 1.15
GIB_IN_GB = 1024 ** 3 / 1e9
PROGRESS_POLL_SECONDS = 5.0

WARNING_REASONS = ("LoaderFailed", "LoaderBlocked")

JobState = Literal["missing", "running", "complete", "failed"]


# ----------------------------------------------------------------------------- names and sizes


def cache_key(spec: OmniDeploymentSpec) -> str:
    """One cache per repository revision and volume kind (a new class or access mode is a new volume)."""
    cache = spec.model.cache
    ident = {"repo": spec.model_repo, "revision": spec.model.revision or "main",
             "storageClassName": cache.storage_class_name if cache else None,
             "accessMode": cache.access_mode if cache else "ReadWriteMany"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]


def cache_name(name: str, key: str) -> str:
    return f"{name}-weights-{key}"


def cache_size(spec: OmniDeploymentSpec) -> str:
    """spec.model.cache.size, else the official checkpoint's size plus headroom, in GiB."""
    if spec.model.cache and spec.model.cache.size:
        return spec.model.cache.size
    gigabytes = CHECKPOINT_GB[spec.model_repo] * SIZE_HEADROOM
    return f"{math.ceil(gigabytes / GIB_IN_GB)}Gi"


# ----------------------------------------------------------------------------- objects


def _annotations(spec: OmniDeploymentSpec) -> dict[str, str]:
    return {REPO_ANNOTATION: spec.model_repo, REVISION_ANNOTATION: spec.model.revision or "main"}


def render_cache(inp: RenderInput, key: str) -> list[dict[str, Any]]:
    """The PVC of one revision and the Job that fills it."""
    spec, name = inp.spec, inp.owner.name
    cache = spec.model.cache
    claim = cache_name(name, key)
    pvc_meta = object_meta(inp, claim, COMPONENT, {KEY_LABEL: key})
    pvc_meta["annotations"] = _annotations(spec)
    pvc_spec: dict[str, Any] = {"accessModes": [cache.access_mode if cache else "ReadWriteMany"],
                                "resources": {"requests": {"storage": cache_size(spec)}},
                                "volumeMode": "Filesystem"}
    if cache and cache.storage_class_name:
        pvc_spec["storageClassName"] = cache.storage_class_name
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": pvc_meta, "spec": pvc_spec}

    env = {Env.ROLE: COMPONENT, Env.MODEL: spec.model_repo, Env.WEIGHTS_DIR: LOADER_MOUNT,
           Env.METRICS_PORT: str(METRICS_PORT), "HF_HOME": "/tmp/huggingface"}
    if spec.model.revision:
        env[Env.MODEL_REVISION] = spec.model.revision
    if cache and cache.endpoint:
        env["HF_ENDPOINT"] = cache.endpoint
    pod_sc, container_sc = security_context()
    container = {
        "name": LOADER_CONTAINER,
        # The gateway image: CPU only, carries omni_runtime and the hub client, no ML stack.
        "image": image_for(inp, "gateway", spec.gateway),
        "imagePullPolicy": spec.gateway.image_pull_policy,
        "command": ["omni-runtime", "fetch-weights"],
        "env": [*env_list(env), *_token_env(spec), *downward_env()],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": container_sc,
        # The loader prints one sentence on failure: it becomes the pod's termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "weights", "mountPath": LOADER_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_sc,
        # The loader talks to the hub, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": claim}},
                    {"name": "tmp", "emptyDir": {}}],
        **pool_placement(spec.gateway, None),
    }
    if spec.gateway.node_pool.affinity:
        pod_spec["affinity"] = json.loads(json.dumps(spec.gateway.node_pool.affinity))
    job_meta = object_meta(inp, claim, COMPONENT, {KEY_LABEL: key})
    job_meta["annotations"] = _annotations(spec)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_meta,
        "spec": {
            "backoffLimit": LOADER_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [
                # Auth, not found, volume too small: retrying cannot help, fail at once and say why.
                {"action": "FailJob", "onExitCodes": {"containerName": LOADER_CONTAINER, "operator": "In",
                                                      "values": [EXIT_PERMANENT]}},
                # A drained or preempted node is not the loader's fault; it resumes elsewhere.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": common_labels(name, COMPONENT, {**inp.extra_labels, KEY_LABEL: key})},
                         "spec": pod_spec},
        },
    }
    return [pvc, job]


def _token_env(spec: OmniDeploymentSpec) -> list[dict[str, Any]]:
    ref = spec.model.token_secret_ref
    if ref is None:
        return []
    # Referenced by name only: the token never passes through the operator.
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def role_mount(spec: OmniDeploymentSpec, claim: str | None) -> ModelMount:
    """The read-only weights volume of thinker and talker pods: a cache (claim) or the user's PVC."""
    if spec.model.pvc:
        pvc = spec.model.pvc
        path = f"{ROLE_MOUNT}/{pvc.path}" if pvc.path else ROLE_MOUNT
        claim_name, model_dir = pvc.claim_name, path
    else:
        assert claim is not None
        claim_name, model_dir = claim, f"{ROLE_MOUNT}/{COMPLETE_DIR}"
    # The weights volume is read-only: anything the libraries cache goes to the pod's /tmp.
    env = {Env.MODEL: model_dir, "HF_HUB_OFFLINE": "1", "HF_HOME": "/tmp/huggingface"}
    # No token: role pods never download.
    return ModelMount(
        env=env_list(env),
        volumes=[{"name": "model", "persistentVolumeClaim": {"claimName": claim_name, "readOnly": True}}],
        mounts=[{"name": "model", "mountPath": ROLE_MOUNT, "readOnly": True}])


# ----------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class LoaderPod:
    """The newest pod of a loader Job, as its kubelet reports it."""

    name: str
    phase: str
    metrics_url: str | None = None
    blocked: str | None = None  # why its container cannot start (secret missing, image pull, unschedulable)
    exit_code: int | None = None
    message: str = ""  # the termination message


@dataclass(frozen=True)
class Progress:
    bytes_done: int | None = None
    bytes_total: int | None = None
    files_done: int | None = None
    files_total: int | None = None


@dataclass(frozen=True)
class CacheState:
    key: str
    claim: str
    pvc_phase: str | None  # None: the PVC is gone
    job: JobState
    failures: int = 0
    job_message: str = ""
    loader: LoaderPod | None = None
    result: dict[str, Any] = field(default_factory=dict)  # the loader's success line (commit, bytes, files)
    last_failure: str = ""
    in_use: bool = False  # a live pod mounts the claim

    @property
    def complete(self) -> bool:
        return self.job == "complete" and self.pvc_phase is not None


@dataclass(frozen=True)
class LiveWeights:
    caches: dict[str, CacheState] = field(default_factory=dict)
    role_claim: str | None = None  # the claim the live thinker/talker workloads mount
    roles_live: bool = False
    progress: dict[str, Progress] = field(default_factory=dict)  # per cache key, scraped from running loaders
    # What status.weights recorded last: the loader's result outlives the pod listing that found it.
    recorded: WeightsStatus | None = None


def _labels_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("labels") or {}


def _job_state(job: dict[str, Any] | None) -> tuple[JobState, int, str]:
    if job is None:
        return "missing", 0, ""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "complete", status.get("failed", 0), ""
        if cond.get("type") == "Failed":
            return "failed", status.get("failed", 0), cond.get("message") or cond.get("reason") or ""
    return "running", status.get("failed", 0), ""


def _loader_pod(pod: dict[str, Any]) -> LoaderPod:
    status = pod.get("status") or {}
    blocked = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            blocked = f"unschedulable: {cond.get('message') or cond.get('reason')}"
    exit_code, message = None, ""
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason") not in (None, "ContainerCreating"):
            waiting = state["waiting"]
            blocked = f"{waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(": ")
        if "terminated" in state:
            exit_code = state["terminated"].get("exitCode")
            message = (state["terminated"].get("message") or "").strip()
    ip = status.get("podIP")
    url = None
    if ip and status.get("phase") == "Running":
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{METRICS_PORT}/metrics"
    return LoaderPod(name=pod["metadata"]["name"], phase=status.get("phase", "Pending"), metrics_url=url,
                     blocked=blocked, exit_code=exit_code, message=message)


def _mounted_claims(pod_spec: dict[str, Any]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes") or []
            if "persistentVolumeClaim" in v}


def _success_line(message: str) -> dict[str, Any]:
    try:
        result = json.loads(message.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return result if isinstance(result, dict) else {}


def observe(live: dict[tuple[str, str], dict[str, Any]], pods: list[dict[str, Any]],
            progress: dict[str, Progress] | None = None, recorded: dict[str, Any] | None = None) -> LiveWeights:
    """What the live children and pods of one OmniDeployment say about its weights."""
    pvcs = {_labels_of(o).get(KEY_LABEL): o for (kind, _), o in live.items()
            if kind == "PersistentVolumeClaim" and _labels_of(o).get(KEY_LABEL)}
    jobs = {_labels_of(o).get(KEY_LABEL): o for (kind, _), o in live.items()
            if kind == "Job" and _labels_of(o).get(KEY_LABEL)}
    in_use = set()
    loader_pods: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        key = _labels_of(pod).get(KEY_LABEL)
        if _labels_of(pod).get("app.kubernetes.io/component") == COMPONENT and key:
            loader_pods.setdefault(key, []).append(pod)
        elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            in_use |= _mounted_claims(pod.get("spec") or {})  # terminating pods still hold their volumes
    caches = {}
    for key in sorted(set(pvcs) | set(jobs)):
        pvc, job = pvcs.get(key), jobs.get(key)
        state, failures, job_message = _job_state(job)
        by_age = sorted(loader_pods.get(key, []), key=lambda p: p["metadata"].get("creationTimestamp") or "")
        observed = [_loader_pod(p) for p in by_age]
        succeeded = [p for p in observed if p.phase == "Succeeded"]
        failed = [p for p in observed if p.phase == "Failed"]
        active = [p for p in observed if p.phase not in ("Succeeded", "Failed")]
        caches[key] = CacheState(
            key=key, claim=(pvc or job)["metadata"]["name"],
            pvc_phase=((pvc.get("status") or {}).get("phase") or "Pending") if pvc else None,
            job=state, failures=failures, job_message=job_message,
            loader=active[-1] if active else None,
            result=_success_line(succeeded[-1].message) if succeeded else {},
            last_failure=failed[-1].message if failed else "",
            in_use=(pvc or job)["metadata"]["name"] in in_use)
    role_claims = [_mounted_claims(((o.get("spec") or {}).get("template") or {}).get("spec") or {})
                   for (kind, _), o in sorted(live.items())
                   if kind == "StatefulSet" and _labels_of(o).get("app.kubernetes.io/component") in ("thinker", "talker")]
    role_claim = next((c for claims in role_claims for c in sorted(claims)), None)
    return LiveWeights(caches=caches, role_claim=role_claim, roles_live=bool(role_claims), progress=progress or {},
                       recorded=_recorded(recorded))


def _recorded(status: dict[str, Any] | None) -> WeightsStatus | None:
    try:
        return WeightsStatus.model_validate(status) if status else None
    except ValueError:  # written by another version: read the pods again instead
        return None


def loaders_to_scrape(live: LiveWeights) -> dict[str, str]:
    """Cache key -> metrics URL of each running loader."""
    return {key: c.loader.metrics_url for key, c in live.caches.items()
            if c.job == "running" and c.loader and c.loader.metrics_url}


def pods_needed(live: dict[tuple[str, str], dict[str, Any]], recorded: dict[str, Any] | None = None) -> bool:
    """Whether the pods must be read: a loader is at work, more than one cache may be in use, or
    a finished loader's result (commit, bytes) is not in the status yet."""
    caches = [o for (kind, _), o in live.items() if kind == "PersistentVolumeClaim" and _labels_of(o).get(KEY_LABEL)]
    jobs = [o for (kind, _), o in live.items() if kind == "Job" and _labels_of(o).get(KEY_LABEL)]
    unrecorded = bool(jobs) and not ((recorded or {}).get("phase") == "Complete" and (recorded or {}).get("commit")
                                     and (recorded or {}).get("claimName") in {j["metadata"]["name"] for j in jobs})
    return len(caches) > 1 or any(_job_state(j)[0] != "complete" for j in jobs) or len(jobs) != len(caches) \
        or unrecorded


def parse_progress(page: str | None) -> Progress | None:
    """The loader's gauges from its /metrics page."""
    if not page:
        return None
    values = {sample.name: sample.value for family in text_string_to_metric_families(page)
              for sample in family.samples}

    def get(metric: str) -> int | None:
        value = values.get(metric)
        return int(value) if value is not None else None

    return Progress(bytes_done=get("omni_weights_bytes_done"), bytes_total=get("omni_weights_bytes_total"),
                    files_done=get("omni_weights_files_done"), files_total=get("omni_weights_files_total"))


# ----------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class WeightsDecision:
    """What the roles mount now, which cache objects must outlive this plan, and what to report."""

    desired_key: str | None  # the cache of the requested revision (None: the user's PVC)
    mount: ModelMount | None  # None: no complete copy to mount, thinker and talker are not rendered
    hold_roles: bool  # live role workloads stay as they are until weights are ready
    keep_claims: frozenset[str]  # live caches (PVC + Job) that must not be pruned yet
    status: WeightsStatus
    condition: dict[str, Any]
    failed: bool  # the loader of the requested revision failed for good
    poll_after: float | None  # read the loader's progress again after this many seconds
    rerun_loader: bool = False  # the Job ran for a PVC that is gone: delete it so a new one fills the new PVC

    @property
    def serving_claim(self) -> str | None:
        return self.status.serving_claim_name


def _gb(n: int | None) -> str:
    return f"{(n or 0) / 1e9:.1f} GB"


def _describe(cache: CacheState, progress: Progress | None) -> tuple[str, str, str]:
    """(phase, condition reason, message) of a cache that is not complete."""
    if cache.job == "missing":
        return "Pending", "CreatingCache", f"creating PVC {cache.claim} and the loader Job that fills it"
    if cache.job == "failed":
        why = cache.last_failure or cache.job_message or "the loader Job failed"
        return "Failed", "LoaderFailed", f"loading {cache.claim} failed: {why}"
    if cache.pvc_phase == "Pending" and (cache.loader is None or cache.loader.phase == "Pending") \
            and not (cache.loader and cache.loader.blocked and not cache.loader.blocked.startswith("unschedulable")):
        return "Pending", "WaitingForVolume", (f"PVC {cache.claim} is Pending: waiting for the cluster to provision "
                                               "a volume (check its storage class and access mode)")
    if cache.loader and cache.loader.blocked:
        return "Pending", "LoaderBlocked", f"loader pod {cache.loader.name} cannot run: {cache.loader.blocked}"
    retry = f" (attempt {cache.failures + 1}; the last one failed: {cache.last_failure})" \
        if cache.failures and cache.last_failure else ""
    if progress and progress.bytes_total:
        return "Downloading", "Downloading", (f"{cache.claim}: {_gb(progress.bytes_done)} of "
                                              f"{_gb(progress.bytes_total)} ({progress.files_done or 0}/"
                                              f"{progress.files_total or 0} files){retry}")
    return "Downloading", "Downloading", f"{cache.claim}: the loader is starting{retry}"


def decide(name: str, spec: OmniDeploymentSpec, live: LiveWeights, generation: int | None) -> WeightsDecision:
    caches = live.caches
    if spec.model.pvc:
        mount = role_mount(spec, None)
        keep = frozenset(c.claim for c in caches.values() if c.in_use)
        status = WeightsStatus(source="PVC", claim_name=spec.model.pvc.claim_name,
                               serving_claim_name=spec.model.pvc.claim_name, phase="Complete")
        cond = condition(WEIGHTS_READY, True, "UserVolume",
                         f"weights on PVC {spec.model.pvc.claim_name} (filled by you)", generation)
        return WeightsDecision(None, mount, False, keep, status, cond, False, None)

    key = cache_key(spec)
    claim = cache_name(name, key)
    desired = caches.get(key) or CacheState(key=key, claim=claim, pvc_phase=None, job="missing")
    old_claims = {c.claim: c for c in caches.values() if c.key != key}
    hold = False
    if desired.complete:
        serving = claim
    elif live.role_claim in old_claims and old_claims[live.role_claim].complete:
        serving = live.role_claim  # keep serving the previous revision until this one is complete
    else:
        # No complete copy: workloads that run on something else (the user's PVC before a switch to a
        # repository, or a cache being refilled) are left as they are rather than stopped.
        serving = None
        hold = live.roles_live
    keep = frozenset(c for c, state in old_claims.items() if c == serving or state.in_use)

    progress = live.progress.get(key)
    result = desired.result
    if not result and live.recorded and live.recorded.claim_name == claim and live.recorded.commit:
        result = {"commit": live.recorded.commit, "bytes": live.recorded.bytes_total, "files": live.recorded.files_total}
    base = dict(source="Cache", repo=spec.model_repo, revision=spec.model.revision or "main", claim_name=claim,
                serving_claim_name=serving)
    failed, poll = False, None
    if desired.complete:
        total = result.get("bytes")
        status = WeightsStatus(**base, commit=result.get("commit"), phase="Complete", bytes_done=total,
                               bytes_total=total, files_done=result.get("files"), files_total=result.get("files"))
        commit = f", commit {result['commit'][:12]}" if result.get("commit") else ""
        cond = condition(WEIGHTS_READY, True, "Cached",
                         f"{spec.model_repo}@{spec.model.revision or 'main'}{commit}"
                         f"{', ' + _gb(total) if total else ''} on PVC {claim}", generation)
    else:
        phase, reason, message = _describe(desired, progress)
        failed = phase == "Failed"
        if serving and serving != claim:
            message += f"; the roles keep serving {serving}"
        status = WeightsStatus(**base, phase=phase,
                               **({"bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total,
                                   "files_done": progress.files_done, "files_total": progress.files_total}
                                  if progress and phase == "Downloading" else {}))
        cond = condition(WEIGHTS_READY, False, reason, message, generation)
        if not failed:
            poll = PROGRESS_POLL_SECONDS
    mount = role_mount(spec, serving) if serving else None
    rerun = desired.job != "missing" and desired.pvc_phase is None
    return WeightsDecision(key, mount, hold, keep, status, cond, failed, poll, rerun)
