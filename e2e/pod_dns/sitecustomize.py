"""Cluster DNS for the runtime processes the node agent runs for kwok pods.

A real pod resolves ``<service>.<namespace>.svc`` through the cluster's DNS; this machine has
none. The node agent puts this directory on the PYTHONPATH of the processes it runs, and
Python imports this module at start-up: it answers service names from the records file the
agent keeps current (``OMNI_E2E_DNS_RECORDS``: {name: [address, ...]}, the ready pods each
Service selects: e2e/service_dns.py), and leaves every other name to the system resolver.

A service name with no ready endpoint fails like an empty DNS answer (EAI_NONAME), as a
headless Service with no ready pod does.
"""

from __future__ import annotations

import json
import os
import socket

_RECORDS = os.environ.get("OMNI_E2E_DNS_RECORDS")
_SUFFIXES = (".svc", ".svc.cluster.local")
_system_getaddrinfo = socket.getaddrinfo
_cache: tuple[float, dict] = (-1.0, {})


def _records() -> dict:
    global _cache
    try:
        mtime = os.stat(_RECORDS).st_mtime
        if mtime != _cache[0]:
            with open(_RECORDS) as f:
                _cache = (mtime, json.load(f))
    except (OSError, ValueError):
        pass  # being replaced: the last records stand
    return _cache[1]


def _cluster_name(host) -> str | None:
    if not isinstance(host, str):
        host = host.decode() if isinstance(host, bytes) else None
    if not host:
        return None
    name = host.rstrip(".").lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".svc"
    return None


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = _cluster_name(host)
    if name is None:
        return _system_getaddrinfo(host, port, family, type, proto, flags)
    addresses = _records().get(name)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    out = []
    for address in addresses:
        out += _system_getaddrinfo(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    return out


if _RECORDS:
    socket.getaddrinfo = getaddrinfo
