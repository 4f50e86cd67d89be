"""What a real node would do for the local control plane, where kwok plays the kubelet.

    python -m e2e.node_agent --kubeconfig KUBECONFIG --state-dir DIR

LocalCluster starts and stops it with its other components (log: ``<logs>/node-agent.log``).
About every half second it
- provisions a hostPath PersistentVolume for each pending claim (e2e/volumes.py),
- runs the operator's weight-loader pods for real and reports their exit (e2e/kubelet.py),
- with ``--serving-pods`` (a cluster started with ``serving=True``, whose kwok leaves the
  operator's serving pods to this node, e2e/kwok_stages.py): while ``serving.json`` names a model
  (``{"model": DIR}``, written by ``serve_pods``) it runs the serving pods (thinker, talker,
  gateway) as a kubelet would (e2e/serving_kubelet.py), from the images its registry holds
  (``"images"``, by default the operator's default images; any other image fails to pull),
  keeps the stand-in cluster DNS's records (e2e/service_dns.py), and its hub serves DIR as the
  default repo; deleted serving pods are stopped and removed whether or not it serves,
and for its whole life serves a stand-in Hugging Face hub (e2e/hub.py) whose default repo is a
small placeholder checkpoint: loader pods that name no ``HF_ENDPOINT`` download from it, as
from a node-level hub mirror (the real hub is unreachable here).

In DIR: ``volumes/`` (one directory per PV), ``pods/<uid>/`` (logs, emptyDirs),
``hub-default/``, ``dns.json`` and ``agent.json`` ({"pid", "hub_url"}, written once it serves).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from e2e.hub import HubStandIn, write_placeholder_checkpoint
from e2e.kubeapi import TRANSPORT_ERRORS, KubeApi
from e2e.kubelet import LoaderKubelet
from e2e.service_dns import ServiceDns
from e2e.serving_kubelet import DEFAULT_IMAGES, ServingKubelet
from e2e.volumes import HostPathProvisioner

INFO_FILE = "agent.json"
SERVING_FILE = "serving.json"
DNS_FILE = "dns.json"
POLL_SECONDS = 0.5

log = logging.getLogger("node-agent")


def read_info(state_dir: Path) -> dict:
    """What a running agent wrote to its state dir ({} before it serves)."""
    try:
        return json.loads((state_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_file(state_dir: Path, name: str, content: dict) -> None:
    tmp = state_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(content))
    tmp.replace(state_dir / name)


def read_serving(state_dir: Path) -> dict:
    """The serving settings ({} while serving is off)."""
    try:
        return json.loads((state_dir / SERVING_FILE).read_text())
    except (OSError, ValueError):
        return {}


def serve_pods(state_dir: Path, model: Path | None, *, images: Iterable[str] | None = None) -> None:
    """Switch serving on with `model` as the hub's default repo, or off with None. `images`: the
    references this node can pull (default: the images the operator renders by default)."""
    if model is None:
        (state_dir / SERVING_FILE).unlink(missing_ok=True)
        return
    settings: dict = {"model": str(Path(model).resolve())}
    if images is not None:
        settings["images"] = sorted(images)
    _write_file(state_dir, SERVING_FILE, settings)


def run(api: KubeApi, state_dir: Path, python: str, stop: threading.Event, *, serving_pods: bool = False) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    hub = HubStandIn()
    placeholder = write_placeholder_checkpoint(state_dir / "hub-default")
    hub.set_default(placeholder)
    hub.start()
    provisioner = HostPathProvisioner(api, state_dir / "volumes")
    kubelet = LoaderKubelet(api, state_dir / "pods", python=python, hub_url=hub.url)
    serving_kubelet = ServingKubelet(api, state_dir / "pods", python=python, hub_url=hub.url,
                                     dns_records=state_dir / DNS_FILE)
    dns = ServiceDns(api, state_dir / DNS_FILE)
    serving: dict = {}
    refused = False
    _write_file(state_dir, INFO_FILE, {"pid": os.getpid(), "hub_url": hub.url})
    log.info("serving; stand-in hub at %s", hub.url)
    try:
        while not stop.is_set():
            wanted = read_serving(state_dir)
            if wanted and not serving_pods:
                if not refused:
                    log.error("serving.json names a model, but this cluster was started without serving pods "
                              "(kwok makes them Ready itself): nothing is run")
                refused, wanted = True, {}
            if wanted != serving:
                if not wanted:
                    serving_kubelet.stop_pods()
                serving_kubelet.images = frozenset(wanted["images"]) if "images" in wanted else DEFAULT_IMAGES
                try:
                    hub.set_default(Path(wanted["model"]) if wanted else placeholder)
                except OSError as e:
                    log.error("cannot serve %s from the hub: %s", wanted.get("model"), e)
                log.info("serving pods %s", f"on, hub default {wanted['model']}" if wanted else "off")
                serving = wanted
            serving_kubelet.starts = bool(serving)  # without a model it only removes deleted pods
            parts = (provisioner, kubelet, *((serving_kubelet,) if serving_pods else ()), *((dns,) if serving else ()))
            for part in parts:
                try:
                    part.sync()
                except TRANSPORT_ERRORS as e:  # the apiserver restarts in some tests: retry next pass
                    log.debug("%s: apiserver unreachable: %s", type(part).__name__, e)
                except Exception:  # noqa: BLE001 - one bad object must not stop the node
                    log.exception("%s failed", type(part).__name__)
            stop.wait(POLL_SECONDS)
    finally:
        kubelet.stop()
        serving_kubelet.stop()
        hub.stop()
        (state_dir / INFO_FILE).unlink(missing_ok=True)
        log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.node_agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs omni_runtime")
    parser.add_argument("--serving-pods", action="store_true",
                        help="kwok leaves the operator's serving pods to this node (run, probe, delete)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.Formatter.converter = time.gmtime
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(KubeApi.from_kubeconfig(args.kubeconfig), args.state_dir.resolve(), args.python, stop,
        serving_pods=args.serving_pods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
