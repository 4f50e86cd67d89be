"""The user's uplink for the realtime benchmark: a TCP relay on loopback that carries each
connection's client -> server bytes at a fixed rate, and server -> client bytes at once.

A realtime session sends its audio while the user speaks, an HTTP request sends the whole
utterance after; on loopback that upload costs nothing, on a phone's uplink it does. Each
connection is one user's link (aiohttp opens one per concurrent request, a session has its
own WebSocket), so users do not share bandwidth. The relay runs on a thread of its own, so
it keeps serving across the benchmark's event loops.
"""

from __future__ import annotations

import asyncio
import threading
import time

from e2e.procs import free_port

PIECE = 1460  # bytes written at a time: a TCP segment's payload on Ethernet


class Uplink:
    def __init__(self, target_port: int, mbps: float):
        self.target_port, self.bytes_per_second = target_port, mbps * 1e6 / 8
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._serve, name="uplink", daemon=True).start()
        if not self.ready.wait(10):
            raise RuntimeError("the uplink relay did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._copy(client_r, server_w, paced=True), self._copy(server_r, client_w, paced=False),
                             return_exceptions=True)
        for w in (client_w, server_w):
            w.close()

    async def _copy(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, paced: bool) -> None:
        """Copy until `src` ends; when `paced`, each piece arrives once the link has carried it
        and the bytes before it (the link idles when the sender does)."""
        free_at = 0.0
        try:
            while data := await src.read(65536):
                if not paced:
                    dst.write(data)
                    await dst.drain()
                    continue
                free_at = max(free_at, time.monotonic())  # the link was idle until now, or is still busy
                for i in range(0, len(data), PIECE):
                    piece = data[i:i + PIECE]
                    free_at += len(piece) / self.bytes_per_second  # oversleeping one piece shortens the next wait
                    if (wait := free_at - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                    dst.write(piece)
                    await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if dst.can_write_eof():
                try:
                    dst.write_eof()
                except (ConnectionError, OSError):
                    pass
