"""Service processes of a local run and the supervisor that starts, watches and stops them.

Start: in order, each waited for until healthy; a service that exits while starting fails the start with its
last log lines. Watch: when any service exits early, everything else is stopped at once and its last log
lines are printed. Stop: in reverse order of start, each with its own graceful signal sequence (e.g. the
rollout service: SIGTERM lets running groups finish, a second SIGTERM cuts them short), then SIGKILL to its
whole process group. Each service runs in a session of its own (a terminal's Ctrl-C reaches the supervisor
only, which stops the services in order) and is told by the kernel to stop when the supervisor dies, even
by SIGKILL (PR_SET_PDEATHSIG), so no service outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HealthCheck = Callable[[], bool]


class ServiceFailed(RuntimeError):
    """A service did not start or exited early; the message carries its last log lines."""


class Stopped(RuntimeError):
    """The supervisor was asked to stop (a signal) while starting or watching."""


_PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes()[-64_000:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    health: HealthCheck | None = None  # None: started means ready
    start_timeout_s: float = 120.0
    # stop: (signal, seconds to wait for exit) steps, then SIGKILL
    stop_sequence: Sequence[tuple[int, float]] = ((signal.SIGTERM, 20.0),)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command_line(self) -> str:
        return " ".join(self.argv)


class Supervisor:
    """Owns the processes of one run. Not thread-safe: one control loop drives it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.services: list[Service] = []
        self.stop_requested: str | None = None  # set (from a signal handler) to end start() / waits with Stopped

    def check_stop(self) -> None:
        if self.stop_requested is not None:
            raise Stopped(self.stop_requested)

    def start(self, svc: Service) -> Service:
        """Start `svc` and wait until healthy; ServiceFailed (with its log tail) if it exits or times out,
        Stopped if a stop is requested meanwhile."""
        self.check_stop()
        svc.log.parent.mkdir(parents=True, exist_ok=True)
        if svc not in self.services:  # listed before it exists: whatever happens next, stop_all() sees it
            self.services.append(svc)
        parent = os.getpid()
        with svc.log.open("ab") as f:
            svc.proc = subprocess.Popen(svc.argv, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **svc.env},
                                        start_new_session=True, preexec_fn=lambda: _stop_with_parent(parent))
        deadline = time.monotonic() + svc.start_timeout_s
        while True:
            self.check_stop()
            code = svc.proc.poll()
            if code is not None:
                raise ServiceFailed(f"{svc.name} exited with code {code} while starting; last lines of {svc.log}:\n"
                                    f"{tail(svc.log)}")
            if svc.health is None or _healthy(svc.health):
                return svc
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{svc.name} not healthy after {svc.start_timeout_s:.0f}s; last lines of {svc.log}:\n"
                                    f"{tail(svc.log)}")
            time.sleep(0.2)

    def restart(self, svc: Service) -> Service:
        """Start a stopped (or killed) service again, appending to its log; waits until healthy."""
        if svc.running:
            raise RuntimeError(f"{svc.name} is still running")
        return self.start(svc)  # keeps its place in the stop order

    def exited(self) -> list[Service]:
        """Services that are no longer running."""
        return [s for s in self.services if not s.running]

    def stop(self, svc: Service) -> int | None:
        """Stop one service with its signal sequence; returns its exit code."""
        p = svc.proc
        if p is None:
            return None
        for sig, wait_s in svc.stop_sequence:
            if p.poll() is not None:
                break
            try:
                p.send_signal(sig)
                p.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        if p.poll() is None:
            self.kill(svc)
            p.wait(10)
        return p.returncode

    def kill(self, svc: Service) -> None:
        """SIGKILL the service and everything it started (its process group)."""
        if svc.proc is not None and svc.proc.poll() is None:
            try:
                os.killpg(svc.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        for svc in self.services:
            self.kill(svc)

    def stop_all(self) -> None:
        """Stop every service, the last started first."""
        for svc in reversed(self.services):
            self.stop(svc)


def _healthy(check: HealthCheck) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - not up yet (connection refused, 503, ...)
        return False
