"""The stand-in cluster DNS of the node agent's serving pods: the records it computes from
Services and pods (e2e/service_dns.py) and the resolver the runtime processes load at start-up
(e2e/pod_dns/sitecustomize.py), run in a real Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from e2e.service_dns import dns_records
from e2e.serving_kubelet import POD_DNS_DIR

pytestmark = pytest.mark.pure


def _pod(name, ip, labels, ready=True, ns="default", **spec):
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_records_hold_the_ready_pods_each_service_selects_and_statefulset_hostnames():
    services = [
        {"metadata": {"name": "thinker-headless", "namespace": "default"}, "spec": {"selector": {"role": "thinker"}}},
        {"metadata": {"name": "gateway", "namespace": "default"}, "spec": {"selector": {"role": "gateway"}}},
        {"metadata": {"name": "external", "namespace": "default"}, "spec": {}},  # no selector: not ours to answer
    ]
    pods = [
        _pod("thinker-0", "127.0.64.3", {"role": "thinker"}, hostname="thinker-0", subdomain="thinker-headless"),
        _pod("thinker-1", "127.0.64.4", {"role": "thinker"}, ready=False),
        _pod("thinker-x", "127.0.64.9", {"role": "thinker"}, ns="other"),
        _pod("gateway-a", "127.0.64.2", {"role": "gateway", "extra": "y"}),
    ]
    assert dns_records(services, pods) == {
        "gateway.default.svc": ["127.0.64.2"],
        "thinker-0.thinker-headless.default.svc": ["127.0.64.3"],
        "thinker-headless.default.svc": ["127.0.64.3"],
    }
    assert dns_records(services[:1], pods[1:2]) == {"thinker-headless.default.svc": []}


def test_processes_resolve_service_names_from_the_records_and_other_names_as_before(tmp_path):
    records = tmp_path / "dns.json"
    records.write_text(json.dumps({"thinker.default.svc": ["127.0.64.3", "127.0.64.4"], "empty.default.svc": []}))
    code = textwrap.dedent(f"""
        import json, os, socket, sys, time
        def ips(name):
            try:
                return sorted({{i[4][0] for i in socket.getaddrinfo(name, 8000, type=socket.SOCK_STREAM)}})
            except socket.gaierror as e:
                return e.errno == socket.EAI_NONAME and "NONAME"
        out = [ips("thinker.default.svc"), ips("thinker.default.svc.cluster.local."), ips("empty.default.svc"),
               ips("missing.default.svc"), ips("127.0.0.1")]
        time.sleep(0.05)
        with open({str(records)!r} + ".tmp", "w") as f:
            json.dump({{"thinker.default.svc": ["127.0.64.5"]}}, f)
        os.utime({str(records)!r} + ".tmp", (time.time() + 5, time.time() + 5))
        os.replace({str(records)!r} + ".tmp", {str(records)!r})
        out.append(ips("thinker.default.svc"))
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(POD_DNS_DIR), "OMNI_E2E_DNS_RECORDS": str(records)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [["127.0.64.3", "127.0.64.4"], ["127.0.64.3", "127.0.64.4"], "NONAME",
                                         "NONAME", ["127.0.0.1"], ["127.0.64.5"]]
