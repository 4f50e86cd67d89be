"""`omni-operator run`: wire the kopf watches, the work queue, leader election,
health and metrics endpoints together."""

from __future__ import annotations

import argparse
import logging
import os
import threading

import kopf
from prometheus_client import start_http_server

from omni_operator.api.resource import KIND
from omni_operator.autoscaling.loop import Autoscaler, fetch_metrics
from omni_operator.controller import metrics, watches
from omni_operator.controller.cache import ObjectCache, prime_from_api
from omni_operator.controller.health import serve_health
from omni_operator.controller.leader import LeaderElector, lease_client
from omni_operator.controller.reconciler import Reconciler
from omni_operator.controller.workqueue import WorkQueue
from omni_operator.kube import LIST_PAGE, Kube

log = logging.getLogger("omni_operator")


def _resync_loop(cache: ObjectCache, queue: WorkQueue, stop: threading.Event, every: float) -> None:
    """Re-enqueue every OmniDeployment now and then: a level-triggered safety net, read from
    the watch cache (a settled object's reconcile then costs no API call either)."""
    while not stop.wait(every):
        for item in cache.items():
            queue.add(item["metadata"]["namespace"], item["metadata"]["name"])


def _enqueue_all(cache: ObjectCache, queue: WorkQueue) -> None:
    """A new leader looks at every object once: what changed while no operator ran (a child
    deleted, a spec edited) brings no watch event of its own, and the watch's first copies of
    the objects are the ones the cache was primed with. Specs not acted on yet go first."""
    for item in cache.items():
        meta = item["metadata"]
        pending = (item.get("status") or {}).get("observedGeneration") != meta.get("generation")
        queue.add(meta["namespace"], meta["name"], first=pending)


def run_operator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kopf logs every watch event it hands to a handler ("Handler ... succeeded"): at a few
        # hundred objects that is most of the log and a share of the CPU; failures still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kube = Kube()
    ready = threading.Event()
    if args.health_port:
        serve_health(args.health_port, ready)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    elector = None
    if args.leader_elect:
        lease_ns = args.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default"
        # The elector has a client of its own, so renewals never wait behind the reconciler's requests.
        elector = LeaderElector(Kube(lease_client()), lease_ns)
        elector.fence(kube)  # once the lease is lost, no write leaves this process (the autoscaler's too)
        elector.acquire()

    cache = ObjectCache(tuple(kind for kind, *_ in watches.WATCHED_CHILDREN), pods=True)
    reconciler = Reconciler(kube, cache, image_repository=args.image_repository, image_tag=args.image_tag,
                            fetch=fetch_metrics, pods_checked_after=args.pods_checked_after)

    def reconcile(namespace: str, name: str) -> None:
        if elector and not elector.leading.is_set():
            return  # the lease is lost and the process is on its way out
        outcome = reconciler.reconcile(namespace, name)
        if outcome.requeue:
            queue.add(namespace, name)
        elif outcome.requeue_after:
            queue.add_after(namespace, name, outcome.requeue_after)
        metrics.QUEUE_DEPTH.set(queue.depth())
        if outcome.applied or outcome.pruned or outcome.error:
            log.info("%s/%s: applied %s, pruned %s%s", namespace, name, outcome.applied or "nothing",
                     outcome.pruned or "nothing", f", error: {outcome.error}" if outcome.error else "")

    queue = WorkQueue(reconcile)
    registry = kopf.OperatorRegistry()
    watches.register(registry, queue.add, queue.add_soon, cache)
    # one LIST per kind, then reads come from the watches
    prime_from_api(cache, kube, KIND, args.namespace, ",".join(f"{k}={v}" for k, v in watches.MANAGED.items()))
    _enqueue_all(cache, queue)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.level = logging.WARNING  # our own Events carry the transitions
        watches.watch_only_managed(settings)
        settings.persistence.diffbase_storage = watches.NoDiffBase()
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # A new leader's first look at every object: kopf lists each watched kind whole by default,
        # and keeps each object's worker (and its last body) 5 s after its event. With a thousand
        # OmniDeployments that held every child and pod at once: 484 MiB against 247 MiB so.
        settings.watching.chunk_size = LIST_PAGE
        settings.queueing.idle_timeout = 0.5

    stop = threading.Event()
    threading.Thread(target=_resync_loop, args=(cache, queue, stop, args.resync_seconds), daemon=True,
                     name="resync").start()
    autoscaler = Autoscaler(kube, queue.add, cache.pods)
    threading.Thread(target=autoscaler.run, args=(stop, cache.items), daemon=True, name="autoscaler").start()
    try:
        kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace,
                 namespaces=args.namespace, ready_flag=ready)
    finally:
        stop.set()
        queue.stop()
        if elector:
            elector.release()
    return 0
