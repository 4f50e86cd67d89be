"""The user's uplink for the realtime benchmark: a TCP relay on loopback that carries each
connection's client -> server bytes at a fixed rate, and server -> client bytes at once.

A realtime session sends its audio while the user speaks, an HTTP request sends the whole
utterance after; on loopback that upload costs nothing, on a phone's uplink it does. Each
connection is one user's link (aiohttp opens one per concurrent request, a session has its
own WebSocket), so users do not share bandwidth. The relay is a process of its own: in the
benchmark's process it would queue each hop behind the client for Python's global lock.

    python -m bench.uplink --port P --target T --mbps R
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

from e2e.procs import free_port, wait_until

PIECE = 8192  # bytes carried at a time: 6.6 ms at 10 Mbit/s


class Uplink:
    """The relay process, from its start until `stop()`."""

    def __init__(self, target_port: int, mbps: float):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.uplink", "--port", str(self.port),
                                      "--target", str(target_port), "--mbps", str(mbps)])
        try:
            wait_until(f"the uplink relay on port {self.port}", self._accepting, timeout=10, interval=0.05)
        except TimeoutError:
            self.stop()
            raise

    def _accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the relay exited with {self.proc.returncode}")
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, bytes_per_second: float | None) -> None:
    """Copy until `src` ends; with a rate, each piece arrives once the link has carried it and
    the bytes before it (the link idles when the sender does)."""
    free_at = 0.0
    try:
        while data := await src.read(65536):
            if bytes_per_second is None:
                dst.write(data)
                await dst.drain()
                continue
            free_at = max(free_at, time.monotonic())  # the link was idle until now, or is still busy
            for i in range(0, len(data), PIECE):
                piece = data[i:i + PIECE]
                free_at += len(piece) / bytes_per_second  # oversleeping one piece shortens the next wait
                if (wait := free_at - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                dst.write(piece)
                await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            pass


async def serve(port: int, target: int, mbps: float) -> None:
    rate = mbps * 1e6 / 8

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(copy(client_r, server_w, rate), copy(server_r, client_w, None), return_exceptions=True)
        for w in (client_w, server_w):
            w.close()

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True, help="where clients connect")
    ap.add_argument("--target", type=int, required=True, help="the server's port on 127.0.0.1")
    ap.add_argument("--mbps", type=float, required=True, help="each connection's client -> server rate")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.target, args.mbps))


if __name__ == "__main__":
    main()
