"""Child processes of `tuneboard up`: each in its own process group, all stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import time


class Supervisor:
    def __init__(self, stop_timeout_s: float = 20.0) -> None:
        self.children: dict[str, subprocess.Popen] = {}
        self.stop_timeout_s = stop_timeout_s
        self._stopping = False

    def start(self, name: str, command: list[str]) -> None:
        self.children[name] = subprocess.Popen(command, start_new_session=True)

    def wait(self) -> int:
        """Block until a child exits or we are told to stop; then stop every child."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        exit_code = 0
        try:
            while not self._stopping:
                for name, child in self.children.items():
                    code = child.poll()
                    if code is not None:
                        print(f"tuneboard: {name} exited with {code}; stopping the rest", flush=True)
                        exit_code = code or 1
                        self._stopping = True
                        break
                time.sleep(0.3)
        finally:
            self.stop()
        return exit_code

    def _on_signal(self, _signum, _frame) -> None:
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM each child's group (the worker stops its trainers and servers), then SIGKILL."""
        for child in self.children.values():
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait()


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass
