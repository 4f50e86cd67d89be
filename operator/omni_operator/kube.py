"""A small, explicit Kubernetes REST layer over the official client's connection.

Only the calls the operator makes: get, list, create, server-side apply, delete with
a uid precondition, status merge-patch and the scale subresource. Objects are
plain dicts (what the renderers produce), so there is no model conversion.
Every write is counted, so tests and benchmarks can prove a no-op reconcile
writes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any, Iterator
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from omni_operator.api.resource import GROUP, PLURAL, VERSION

FIELD_MANAGER = "omni-operator"

# kind -> (group/version path prefix, plural); the operator touches nothing else.
RESOURCES: dict[str, tuple[str, str]] = {
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "OmniDeployment": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}

BUILTIN_KINDS = set(RESOURCES) - {"ScaledObject", "OmniDeployment"}


def holds_created_fields(obj: dict[str, Any]) -> bool:
    """True while the fields our create wrote are still owned by that create (an Update entry of
    our field manager) rather than by our applies: see Kube.own_created_fields."""
    return any(e.get("manager") == FIELD_MANAGER and e.get("operation") == "Update" and not e.get("subresource")
               for e in obj["metadata"].get("managedFields") or [])


def _union(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Union of two managed-field sets (fieldsV1 tries: nested dicts, leaves are {})."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _union(out[key], value) if isinstance(out.get(key), dict) else value
    return out


def api_version(kind: str) -> str:
    prefix = RESOURCES[kind][0]
    return prefix.removeprefix("/apis/").removeprefix("/api/")


UNSERVED_RECHECK_SECONDS = 300.0  # an optional API (KEDA) installed later is noticed within this
LIST_PAGE = 500  # items per page of the first LISTs of a new leader, its own and kopf's (as client-go's reflector)

RETRYABLE = {409, 429, 500, 502, 503, 504}


class KubeError(Exception):
    def __init__(self, status: int, reason: str, body: str = ""):
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body

    @property
    def message(self) -> str:
        """The apiserver's own words (a Status' message names the field it refused), else the error."""
        try:
            found = json.loads(self.body).get("message")
        except (ValueError, AttributeError):
            found = None
        return found if isinstance(found, str) and found else str(self)


def load_api_client() -> client.ApiClient:
    """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None, timeout: float = 30.0):
        self.api = api_client or load_api_client()
        self.timeout = timeout
        self.writes: Counter[str] = Counter()  # "PATCH StatefulSet" -> count
        self.reads: Counter[str] = Counter()  # "GET /apis/apps/v1/..." -> count
        self._unserved: dict[str, float] = {}  # kind -> monotonic time to ask again
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", retries: int = 4, timeout: float | None = None,
                with_status: bool = False) -> Any:
        """`timeout`: seconds for each attempt instead of the client's default (the leader elector
        bounds its requests by its renew deadline). `with_status`: (HTTP status, body)."""
        if query:
            path += "?" + urlencode(query)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            headers["Content-Type"] = content_type
            # The client serialises JSON content types itself; apply patches go as text (JSON is YAML).
            payload = body if "json" in content_type else json.dumps(body)
        with self._lock:
            dry = " dryRun" if query and query.get("dryRun") else ""  # a check, counted apart from writes
            (self.reads if method == "GET" else self.writes)[f"{method} {path.split('?')[0]}{dry}"] += 1
        delay = 0.2
        for attempt in range(retries + 1):
            try:
                _, url, hdrs, _, _ = self.api.param_serialize(method, path, header_params=headers,
                                                              auth_settings=["BearerToken"])
                resp = self.api.call_api(method, url, header_params=hdrs, body=payload,
                                         _request_timeout=self.timeout if timeout is None else timeout)
                data = resp.read() if hasattr(resp, "read") else resp.data
                if resp.status >= 400:
                    raise _api_exception(resp.status, resp.reason, data or b"")
                parsed = json.loads(data) if data else None
                return (resp.status, parsed) if with_status else parsed
            except ApiException as err:
                if err.status in RETRYABLE and attempt < retries and not (err.status == 409 and method == "POST"):
                    time.sleep(delay)
                    delay = min(delay * 2, 3.0)
                    continue
                raise KubeError(err.status or 0, err.reason or "", err.body or "") from None

    # ------------------------------------------------------------------ verbs

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def _list_once(self, kind: str, namespace: str | None, query: dict[str, Any]) -> dict[str, Any] | None:
        """One LIST request; None when the kind is not served (e.g. KEDA not installed), which is
        remembered for a while so every reconcile does not ask again."""
        if self._unserved.get(kind, 0.0) > time.monotonic():
            return None
        try:
            return self.request("GET", self.path(kind, namespace), query=query)
        except KubeError as err:
            if err.status == 404 and kind not in BUILTIN_KINDS:
                self._unserved[kind] = time.monotonic() + UNSERVED_RECHECK_SECONDS
                return None
            raise

    def list_pages(self, kind: str, namespace: str | None, label_selector: str | None = None, *,
                   limit: int = LIST_PAGE) -> Iterator[list[dict[str, Any]]]:
        """Items of a kind, `limit` at a time (a LIST of everything at once is held whole in
        memory, several times its size as Python objects). If the apiserver no longer serves
        the rest of a list (410: it compacted past it), the whole list comes again in one page:
        items already seen may come twice."""
        query: dict[str, Any] = {"limit": limit, **({"labelSelector": label_selector} if label_selector else {})}
        while True:
            try:
                result = self._list_once(kind, namespace, query)
            except KubeError as err:
                if err.status == 410 and "continue" in query:
                    yield self.list(kind, namespace, label_selector)
                    return
                raise
            if result is None:
                return
            yield list(result.get("items") or [])
            query["continue"] = (result.get("metadata") or {}).get("continue")
            if not query["continue"]:
                return

    def list(self, kind: str, namespace: str | None, label_selector: str | None = None, *,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        """Items of a kind; none when the kind is not served (see _list_once)."""
        query = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        result = self._list_once(kind, namespace, query)
        return list(result.get("items") or []) if result is not None else []

    def apply(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply under the operator's single field manager, with force: what the
        operator renders is its own (a new child is created, never applied: see create).
        `dry_run`: admitted, not stored (dryRun=All)."""
        meta = obj["metadata"]
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return self.request("PATCH", self.path(obj["kind"], meta.get("namespace"), meta["name"]), query=query,
                            body=obj, content_type="application/apply-patch+yaml")

    def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any] | None:
        """POST under the operator's field manager: None when the name is taken (AlreadyExists).
        Unlike an apply, a create never writes into an object that exists, so the name needs no
        check first. `dry_run`: admitted, not stored (dryRun=All)."""
        meta = obj["metadata"]
        query = {"fieldManager": FIELD_MANAGER} | ({"dryRun": "All"} if dry_run else {})
        try:
            return self.request("POST", self.path(obj["kind"], meta.get("namespace")), query=query, body=obj)
        except KubeError as err:
            if err.status == 409:
                return None
            raise

    def own_created_fields(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Move the fields of our create's Update entry into our Apply entry. An apply removes
        only fields that its own entry owns and the new config drops: without this, a field the
        plan stops rendering would stay on a child we created, owned by the create. The create
        also owns what the apiserver defaulted (an autoscaler's replicas among them): the next
        apply, which leaves them out, releases them and they are defaulted again. Guarded by the
        resourceVersion; None when the object is gone."""
        for attempt in range(3):
            live = self.get(kind, namespace, name)
            if live is None or not holds_created_fields(live):
                return live
            entries = live["metadata"]["managedFields"]
            ours = [e for e in entries if e.get("manager") == FIELD_MANAGER and not e.get("subresource")]
            merged = {**ours[0], "operation": "Apply", "fieldsV1": {}}
            for entry in ours:
                merged["fieldsV1"] = _union(merged["fieldsV1"], entry.get("fieldsV1") or {})
            managed = [e for e in entries if e not in ours] + [merged]
            body = {"metadata": {"resourceVersion": live["metadata"]["resourceVersion"], "managedFields": managed}}
            try:
                return self.request("PATCH", self.path(kind, namespace, name), query={"fieldManager": FIELD_MANAGER},
                                    body=body, content_type="application/merge-patch+json", retries=0)
            except KubeError as err:
                if err.status != 409 or attempt == 2:
                    raise
        return None

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete, only if the object is still the one we saw (uid precondition). False when gone."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", self.path(kind, namespace, name), body=body)
            return True
        except KubeError as err:
            if err.status in (404, 409):
                return False
            raise

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any], *,
                     resource_version: str | None = None) -> dict[str, Any] | None:
        """Merge-patch the status. With `resource_version` a concurrent change answers 409
        (raised, not retried: the caller must re-read and decide again)."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self.request("PATCH", self.path(kind, namespace, name, "status"), body=body,
                                content_type="application/merge-patch+json",
                                retries=0 if resource_version else 4)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def scale(self, kind: str, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
        try:
            return self.request("PATCH", self.path(kind, namespace, name, "scale"),
                                query={"fieldManager": FIELD_MANAGER},
                                body={"spec": {"replicas": replicas}}, content_type="application/merge-patch+json")
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def create_event(self, namespace: str, involved: dict[str, Any], *, reason: str, message: str,
                     type_: str = "Normal") -> None:
        meta = involved["metadata"]
        now = _now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta["name"], "namespace": namespace, "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": type_,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
        }
        try:
            self.request("POST", self.path("Event", namespace), body=event, retries=1)
        except KubeError:
            pass  # events are best effort; never fail a reconcile over one


def _api_exception(status: int, reason: str | None, data: bytes) -> ApiException:
    err = ApiException(status=status, reason=reason or "")
    err.body = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    return err


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
