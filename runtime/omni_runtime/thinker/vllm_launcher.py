"""`omni-runtime thinker --engine vllm`: build the `vllm serve` command from the
operator's environment, supervise it, republish its queue metrics, drain on SIGTERM.

Multi-node replicas use vLLM's own multiprocessing multi-node mode (no Ray): every pod
of a replica runs `vllm serve` with `--nnodes/--node-rank/--master-addr/--master-port`
and `--distributed-executor-backend mp`; ranks > 0 add `--headless` (no API server).
The node rank is the StatefulSet ordinal, the `-N` suffix of POD_NAME.

The metrics port also serves `GET /v1/omni/mm-states/<rid>`: the multimodal states the
omni_runtime vLLM plugin (vllm_plugin.py) exported for the request sent with
`X-Request-Id: <rid>`, as payload v1's `mm` object.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time

from omni_runtime.config import ConfigError, Env, LauncherSettings, MMStatesSettings

log = logging.getLogger("omni.launcher")

# Flags the launcher sets itself; OMNI_VLLM_ARGS may not carry them.
OWNED_FLAGS = (
    "--port", "--host", "--served-model-name", "--model", "--revision", "--nnodes", "--node-rank",
    "--master-addr", "--master-port", "--headless",
)


class LauncherError(ConfigError):
    pass


def check_vllm_args(args: list[str]) -> list[str]:
    """OMNI_VLLM_ARGS may add any flag but those the launcher sets itself."""
    for item in args:
        flag = item.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise LauncherError(f"{Env.VLLM_ARGS} must not set {flag}: the launcher sets it from OMNI_* variables")
    if args and not args[0].startswith("-"):
        raise LauncherError(f"{Env.VLLM_ARGS} must start with a flag, got {args[0]!r} (the model comes from {Env.MODEL})")
    return args


def node_rank_from_pod_name(pod_name: str) -> int:
    m = re.search(r"-(\d+)$", pod_name or "")
    if not m:
        raise LauncherError(f"POD_NAME={pod_name!r} has no StatefulSet ordinal suffix (-N) to take the node rank from")
    return int(m.group(1))


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def build_vllm_command(cfg: LauncherSettings, vllm_bin: str = "vllm") -> tuple[list[str], dict]:
    """Pure: settings -> (argv, facts). Raises LauncherError with a clear message."""
    model = cfg.model
    extra = check_vllm_args(cfg.vllm_args)
    nnodes = cfg.nnodes
    served = cfg.served_model_name or model
    argv = [vllm_bin, "serve", model, "--served-model-name", served, "--host", "0.0.0.0", "--port", str(cfg.port)]
    if cfg.revision:
        argv += ["--revision", cfg.revision]
    argv += extra
    facts = {"nnodes": nnodes, "node_rank": 0, "headless": False, "port": cfg.port, "served_model_name": served}
    if nnodes > 1:
        rank = node_rank_from_pod_name(cfg.pod_name)
        if rank >= nnodes:
            raise LauncherError(f"node rank {rank} (from POD_NAME={cfg.pod_name!r}) is outside {Env.NNODES}={nnodes}")
        if not cfg.master_addr:
            raise LauncherError(f"{Env.MASTER_ADDR} is required when {Env.NNODES} > 1 (DNS name of the replica's pod 0)")
        backend = _flag_value(extra, "--distributed-executor-backend")
        if backend not in (None, "mp"):
            raise LauncherError(f"multi-node replicas use vLLM's mp backend; {Env.VLLM_ARGS} sets "
                                f"--distributed-executor-backend {backend}")
        if backend is None:
            argv += ["--distributed-executor-backend", "mp"]
        argv += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr", cfg.master_addr,
                 "--master-port", str(cfg.master_port)]
        if rank > 0:
            argv.append("--headless")
        facts.update(node_rank=rank, headless=rank > 0, master_addr=cfg.master_addr, master_port=cfg.master_port)
    return argv, facts


# -- supervisor -------------------------------------------------------------------------

# vLLM's API server answers /metrics slowly while it streams tokens on a busy CPU; a
# timed-out scrape would leave the queue gauges at their previous value.
SCRAPE_TIMEOUT = 8.0


async def _http_get(url: str, timeout: float = SCRAPE_TIMEOUT) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url) as r:
            return r.status, await r.text()


def vllm_load(values: dict[str, float]) -> tuple[float, float]:
    """(waiting, running) from vLLM's parsed /metrics."""
    return values.get("vllm:num_requests_waiting", 0.0), values.get("vllm:num_requests_running", 0.0)


def vllm_finished(values: dict[str, float]) -> float | None:
    """Requests vLLM finished (all reasons summed), when its /metrics has the counter."""
    return values.get("vllm:request_success_total")


# A reader may ask the states endpoint to hold its answer (`?wait=SECONDS`) until the states
# are published: the store is a local directory, so looking every 10 ms here costs less than a
# reader's HTTP poll and gives the states to the talker up to a poll interval sooner.
STATES_MAX_WAIT = 2.0
STATES_LOOK_EVERY = 0.01


def states_wait(query) -> float:
    """The `wait` query parameter in seconds, within [0, STATES_MAX_WAIT]; ValueError if it is not a number."""
    raw = query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = float("nan")
    if wait != wait:  # not a number, or NaN
        raise ValueError(f"wait must be a number of seconds (at most {STATES_MAX_WAIT:g}), not {raw[:40]!r}")
    return min(max(wait, 0.0), STATES_MAX_WAIT)


def mm_states_routes(app, store) -> None:
    """GET /v1/omni/mm-states/<rid>[?wait=SECONDS] on the metrics app (contract: 200 the `mm`
    object, 404 while unknown, after up to `wait` seconds of waiting for it; a 404 with
    "final": true says the states will never come, and why)."""
    from aiohttp import web

    async def handler(request):
        rid = request.match_info["rid"]
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + states_wait(request.query)
            while (obj := await loop.run_in_executor(None, store.take, rid)) is None and loop.time() < deadline:
                await asyncio.sleep(STATES_LOOK_EVERY)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if obj is None:
            return web.json_response({"error": f"no multimodal states for {rid}: not captured yet, already fetched, "
                                               "expired, or a prompt without audio/image/video"}, status=404)
        if "error" in obj:
            return web.json_response({"error": f"multimodal states for {rid} are not available: {obj['error']}",
                                      "final": True}, status=404)
        return web.json_response(obj)

    app.router.add_get("/v1/omni/mm-states/{rid}", handler)


def mm_states_store(cfg: MMStatesSettings):
    """The store the plugin's exports land in; (store, owned): an unset directory is a private one,
    removed when the process ends."""
    from omni_runtime.thinker.mm_store import MMStatesStore, default_dir

    return MMStatesStore(cfg.dir or default_dir(), cfg.ttl, cfg.max_bytes), cfg.dir is None


async def supervise(argv: list[str], facts: dict, cfg: LauncherSettings) -> int:
    from aiohttp import web

    from omni_runtime.metrics import CONTENT_TYPE_LATEST, ThinkerMetrics, metrics_app, parse_prometheus_text
    from omni_runtime.server import DrainTimes, Phase, serve

    metrics = ThinkerMetrics()
    store, owned = mm_states_store(cfg.mm_states)
    log.info("starting: %s", " ".join(argv))
    # The plugin in vLLM's engine process writes the states where the store reads them;
    # without OMNI_MM_STATES_DIR it stays inert.
    child_env = {k: v for k, v in os.environ.items() if k != Env.MM_STATES_DIR}
    if cfg.mm_states.export:
        child_env[Env.MM_STATES_DIR] = str(store.dir)
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, env=child_env)
    stopping = asyncio.Event()
    engine = f"http://127.0.0.1:{facts['port']}"
    state = {"waiting": 0.0, "running": 0.0, "ready": False}

    async def scrape_loop():
        while True:
            if not facts["headless"]:
                try:
                    status, text = await _http_get(engine + "/metrics")
                    values = parse_prometheus_text(text) if status == 200 else {}
                    state["waiting"], state["running"] = vllm_load(values)
                    if (finished := vllm_finished(values)) is not None:
                        metrics.finished_to(finished)
                    metrics.scrape_ok.set(1 if status == 200 else 0)
                    hs, _ = await _http_get(engine + "/health")
                    state["ready"] = hs == 200
                except Exception:  # noqa: BLE001 - engine still starting
                    metrics.scrape_ok.set(0)
                    state["ready"] = False
            else:
                state["ready"] = proc.returncode is None
            metrics.queue_depth.set(state["waiting"])
            metrics.running.set(state["running"])
            metrics.ready.set(1 if state["ready"] and not stopping.is_set() else 0)
            await asyncio.get_running_loop().run_in_executor(None, store.sweep)
            await asyncio.sleep(0.5 if stopping.is_set() else 2.0)

    app = metrics_app(metrics)
    mm_states_routes(app, store)
    sites = [(app, "0.0.0.0", cfg.metrics_port)]
    if facts["headless"]:
        # Headless ranks have no vLLM API server: answer the pod's probes here. Ready
        # while the worker lives and the replica's leader answers /health.
        leader = f"http://{facts['master_addr']}:{facts['port']}/health"

        async def health(_request):
            if stopping.is_set():
                return web.json_response({"status": "draining"}, status=503)
            if proc.returncode is not None:
                return web.json_response({"status": "worker exited"}, status=503)
            try:
                status, _ = await _http_get(leader, timeout=1.0)
            except Exception:  # noqa: BLE001
                status = 0
            ok = status == 200
            return web.json_response({"status": "ok" if ok else "leader not ready", "rank": facts["node_rank"]},
                                     status=200 if ok else 503)

        async def no_engine_metrics(_request):
            # The PodMonitor scrapes vLLM's /metrics on every thinker pod's http port; a 404 would mark
            # this pod down. vLLM's series are rank 0's; the launcher's own are on the metrics port.
            return web.Response(text=f"# node rank {facts['node_rank']} runs headless: vLLM's metrics are on rank 0\n",
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        headless = web.Application()
        headless.router.add_get("/health", health)
        headless.router.add_get("/metrics", no_engine_metrics)
        sites.append((headless, "0.0.0.0", facts["port"]))

    async def exited() -> int:
        code = await proc.wait()
        if not stopping.is_set():
            log.error("vllm exited on its own with %s", code)
        return code if code > 0 else 1

    async def busy() -> bool:
        # Asked afresh each time: the periodic scrape can predate requests that arrived
        # just before. An unanswered scrape counts as busy.
        try:
            status, text = await _http_get(engine + "/metrics")
            return status != 200 or sum(vllm_load(parse_prometheus_text(text))) > 0
        except Exception:  # noqa: BLE001 - engine not answering
            return True

    async def drain() -> None:
        metrics.draining.set(1)
        began = time.monotonic()
        times = DrainTimes(cfg.shutdown_delay, cfg.drain_seconds)
        deadline = began + times.expires_at
        if not facts["headless"]:
            # vLLM cannot be told to refuse new requests, and the gateways keep sending some until
            # the pod's removal from the Service reaches their DNS: vLLM serves them through the
            # shutdown delay, then stops once it holds none (or the drain's time is up).
            while proc.returncode is None:
                phase = times.phase(time.monotonic() - began)
                if phase is Phase.EXPIRED or (phase is Phase.CLOSING and not await busy()):
                    break
                await asyncio.sleep(0.5)
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=max(5.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("vllm did not stop in time: SIGKILL")
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()

    scraper = asyncio.ensure_future(scrape_loop())
    try:
        return await serve(sites, drain, exited=exited(), stopping=stopping)
    finally:
        # vLLM's API server stops its engine processes on the way out; any still in its
        # process group now are stragglers.
        _signal_group(proc.pid, signal.SIGKILL)
        scraper.cancel()
        if owned:
            store.remove_all()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run(environ=None) -> int:
    cfg = LauncherSettings.from_env(environ)
    argv, facts = build_vllm_command(cfg)
    return asyncio.run(supervise(argv, facts, cfg))
