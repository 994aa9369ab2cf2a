"""Child processes of `tuneboard up`: each in its own process group, all stopped together.

The web panel is the one that matters: when it exits, everything stops. A worker that dies (the
OOM killer, a crash) is started again with backoff while the panel stays up; the panel declares
its runs lost and a Resume continues them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

# Backoff between restarts of a child that keeps dying; reset once it has lived a while.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HEALTHY_AFTER_S = 60.0
POLL_S = 0.3


@dataclass
class Child:
    command: list[str]
    restart: bool
    process: subprocess.Popen
    started_at: float
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    def __init__(self, stop_timeout_s: float = 20.0) -> None:
        self.children: dict[str, Child] = {}
        self.stop_timeout_s = stop_timeout_s
        self._stopping = False

    def start(self, name: str, command: list[str], *, restart: bool = False) -> None:
        self.children[name] = Child(command, restart, _spawn(command), time.monotonic())

    def wait(self) -> int:
        """Block until a child that is not restarted exits or we are told to stop; then stop every
        child."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        exit_code = 0
        try:
            while not self._stopping:
                for name, child in self.children.items():
                    code = self._check(name, child)
                    if code is not None:
                        exit_code = code
                        self._stopping = True
                        break
                time.sleep(POLL_S)
        finally:
            self.stop()
        return exit_code

    def _check(self, name: str, child: Child) -> int | None:
        """None while all is well; the exit code when this child's exit ends the supervisor."""
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                print(f"tuneboard: starting {name} again", flush=True)
                child.process, child.started_at, child.restart_at = _spawn(child.command), now, None
            return None
        code = child.process.poll()
        if code is None:
            return None
        if not child.restart:
            print(f"tuneboard: {name} exited with {code}; stopping the rest", flush=True)
            return code or 1
        _signal_group(child.process, signal.SIGKILL)  # what it started dies with it
        child.failures = 1 if now - child.started_at >= HEALTHY_AFTER_S else child.failures + 1
        delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S)) - 1]
        child.restart_at = now + delay
        print(f"tuneboard: {name} exited with {code}; starting it again in {delay:.0f} s", flush=True)
        return None

    def _on_signal(self, _signum, _frame) -> None:
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM each child's group (the worker stops its trainers and servers), then SIGKILL."""
        running = [child.process for child in self.children.values() if child.restart_at is None]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _spawn(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, start_new_session=True)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
