"""Local processes of the control plane: liveness by pid, signals, ports, log tails.

Only the standard library; Linux (/proc, prctl).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable


class ClusterError(RuntimeError):
    """The control plane could not be started or is not healthy."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; the message carries its output."""

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd)
        out = (self.stderr or "").strip() or (self.output or "").strip()
        return f"`{cmd}` exited with {self.returncode}:\n{tail_text(out, 40)}"


def tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return tail_text(data, lines)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2,
               error: type[Exception] = TimeoutError) -> Any:
    """Poll `check` until it returns something truthy (which is returned); on timeout raise `error`
    naming `what` and the last answer (or exception) `check` gave."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# Where processes sit in the root cgroup, as on a development or CI machine, the kernel schedules
# each session as one group (autogroup). vLLM's CPU build, which the thinker's launcher starts in a
# session of its own, then starved the session that started it (the launcher's metrics, a test's
# samplers, a benchmark's client) for up to 14 s at a time on 2 cores: a probe waking every 50 ms
# on the second core saw no CPU for that long, and no gap with autogroups off or with vLLM's group
# at nice 19 (its load then took 12 % longer). In a pod every process shares the pod's cgroup and
# competes per task; the lowest priority for the child's group restores that here.
SESSION_GROUP_NICE = 19


def lower_session_group(parent: subprocess.Popen, timeout: float = 600) -> threading.Thread:
    """In the background, give the first session that a descendant of `parent` starts the nice
    SESSION_GROUP_NICE as soon as it exists (a kernel without autogroups has nothing to lower)."""

    def watch() -> None:
        ours = os.getsid(0)
        deadline = time.monotonic() + timeout
        while parent.poll() is None and time.monotonic() < deadline:
            for pid in descendants(parent.pid):
                try:
                    if os.getsid(pid) != ours:
                        Path(f"/proc/{pid}/autogroup").write_text(str(SESSION_GROUP_NICE))
                        return
                except FileNotFoundError:
                    if not Path("/proc/self/autogroup").exists():
                        return
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, name="lower-session-group", daemon=True)
    thread.start()
    return thread


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (from /proc), for cleaning up after a process that forks."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux prctl).

    SIGKILL, not SIGTERM: an orphaned throwaway cluster has nothing worth saving, and
    an apiserver that loses etcd at the same moment lingers on SIGTERM."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def pid_argv(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return None


def signal_process(pid: int, sig: int) -> None:
    """Signal the process group when pid leads one (our components do), else the process."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
