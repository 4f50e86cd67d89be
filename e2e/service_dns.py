"""The stand-in cluster DNS's records, kept by the node agent from the Services and pods.

The records are what a cluster DNS would answer, written to one JSON file which the runtime
processes read through e2e/pod_dns/sitecustomize.py:

- ``<service>.<namespace>.svc``: the addresses of the ready pods the Service selects (a
  headless Service's A records; a ClusterIP Service's too, since nothing here routes a
  cluster IP);
- ``<hostname>.<service>.<namespace>.svc``: a StatefulSet pod under its governing Service.

They are computed here, not read from EndpointSlices, because the apiserver refuses loopback
addresses in endpoints and kwok gives pods loopback addresses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from e2e.kubeapi import KubeApi
from e2e.kubelet import pod_ready

log = logging.getLogger("node-agent.dns")


def dns_records(services: list[dict], pods: list[dict]) -> dict[str, list[str]]:
    """Name -> sorted addresses of ready pods."""
    records: dict[str, set[str]] = {}
    for svc in services:
        selector = svc.get("spec", {}).get("selector")
        if not selector:
            continue  # a Service without a selector has endpoints someone else writes
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        fqdn = f"{name}.{ns}.svc"
        records.setdefault(fqdn, set())
        for pod in pods:
            meta, ip = pod["metadata"], pod.get("status", {}).get("podIP")
            labels = meta.get("labels") or {}
            if meta["namespace"] != ns or not ip or meta.get("deletionTimestamp") or not pod_ready(pod):
                continue
            if all(labels.get(k) == v for k, v in selector.items()):
                records[fqdn].add(ip)
                if pod["spec"].get("hostname") and pod["spec"].get("subdomain") == name:
                    records.setdefault(f"{pod['spec']['hostname']}.{fqdn}", set()).add(ip)
    return {name: sorted(addrs) for name, addrs in sorted(records.items())}


class ServiceDns:
    def __init__(self, api: KubeApi, path: Path):
        self.api, self.path = api, path
        self.written: dict[str, list[str]] | None = None

    def sync(self) -> None:
        lists = []
        for path in ("/api/v1/services", "/api/v1/pods"):
            status, body = self.api.request("GET", path)
            if status != 200:
                log.warning("listing %s: HTTP %s %s", path, status, body)
                return
            lists.append(body.get("items", []))
        records = dns_records(*lists)
        if records == self.written:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(self.path)  # readers see the old file or the new one, never half of one
        self.written = records
