"""`omni-operator run`: wire the kopf watches, the work queue, leader election,
health and metrics endpoints together."""

from __future__ import annotations

import argparse
import logging
import os
import threading

import kopf
from prometheus_client import start_http_server

from . import handlers, metrics
from .api import KIND
from .kube import Kube, KubeError
from .leader import LeaderElector
from .reconcile import Reconciler, WorkQueue

log = logging.getLogger("omni_operator")

RESYNC_SECONDS = 60.0


def _resync_loop(kube: Kube, queue: WorkQueue, namespaces: list[str], stop: threading.Event) -> None:
    """Re-enqueue every OmniDeployment now and then: level-triggered safety net for missed events."""
    while not stop.wait(RESYNC_SECONDS):
        try:
            for ns in namespaces or [None]:
                for item in kube.list(KIND, ns):
                    queue.add(item["metadata"]["namespace"], item["metadata"]["name"])
        except KubeError as err:
            log.warning("resync list failed: %s", err)


def run_operator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kube = Kube()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    elector = None
    if args.leader_elect:
        lease_ns = args.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default"
        elector = LeaderElector(kube, lease_ns)
        elector.acquire()

    reconciler = Reconciler(kube, image_repository=args.image_repository, image_tag=args.image_tag)

    def reconcile(namespace: str, name: str) -> None:
        outcome = reconciler.reconcile(namespace, name)
        metrics.QUEUE_DEPTH.set(queue.depth())
        if outcome.applied or outcome.pruned or outcome.error:
            log.info("%s/%s: applied %s, pruned %s%s", namespace, name, outcome.applied or "nothing",
                     outcome.pruned or "nothing", f", error: {outcome.error}" if outcome.error else "")

    queue = WorkQueue(reconcile)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, queue.add)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.level = logging.WARNING  # our own Events carry the transitions
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    stop = threading.Event()
    threading.Thread(target=_resync_loop, args=(kube, queue, args.namespace, stop), daemon=True,
                     name="resync").start()
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    try:
        kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace,
                 namespaces=args.namespace, liveness_endpoint=liveness)
    finally:
        stop.set()
        queue.stop()
        if elector:
            elector.release()
    return 0
