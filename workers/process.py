"""A child process the worker owns, with everything it starts: stopped with an escalation, and
never outliving the worker.

Shared by the training supervisor (llamafactory-cli, maybe torchrun and its ranks) and the
deployment supervisor (vLLM and its engine process). The command runs under
workers/group_guard.py, in a session of its own: the guard adopts the tree's orphans, exits only
once the whole tree is gone, and is started with PR_SET_PDEATHSIG: if the worker dies, even by
kill -9, the guard kills the whole tree. Signals go to every process of the tree, not to a
process group: torchrun puts each rank in a session of its own.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from workers.group_guard import DEATH_SIGNAL, descendants

log = logging.getLogger(__name__)

GUARD_SCRIPT = Path(__file__).with_name("group_guard.py")
PR_SET_PDEATHSIG = 1
# Resolved once here: the preexec hook runs between fork and exec, where loading a library
# (or anything else that may take a lock another thread holds) could deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _set_death_signal() -> None:
    _prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)


class _Launcher:
    """Forks every managed child from one thread that lives as long as the worker process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
    Celery's pool threads, a test's thread or a short-lived helper thread may end while the
    child should keep running, so none of them forks; they hand the Popen call to this thread.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, **kwargs: object) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tuneboard-launcher", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put((kwargs, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            kwargs, future = self._requests.get()
            try:
                future.set_result(subprocess.Popen(**kwargs))
            except BaseException as error:  # reported to the caller, the launcher keeps serving
                future.set_exception(error)


_launcher = _Launcher()


class ManagedProcess:
    """`command` with `env` (the whole environment) in `cwd`, stdout and stderr appended to
    `log_path`. `poll()` both reports the exit code and drives a requested stop, so a caller's
    loop can stop a process without blocking; `stop()` is the blocking form."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        cwd: str | Path,
        log_path: str | Path,
        *,
        term_grace_s: float = 5.0,
    ) -> None:
        self.command = list(command)
        self.term_grace_s = term_grace_s
        self._exit_code: int | None = None
        self._stop_signal_at: float | None = None
        self._term_at: float | None = None
        self._kill_at: float | None = None
        with open(log_path, "ab") as log_file:
            self._popen = _launcher.popen(
                args=[sys.executable, "-I", str(GUARD_SCRIPT), str(os.getpid()), "--", *self.command],
                env=dict(env),
                cwd=str(cwd),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_set_death_signal,
            )
        self.pid = self._popen.pid  # the guard's: the root of the tree

    def signal_tree(self, signum: int) -> None:
        """`signum` to every process of the tree, deepest first (as LLaMA Board aborts a run:
        the ranks get SIGABRT before the launchers above them)."""
        for pid in [*reversed(descendants(self.pid)), self.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def request_stop(self, grace_s: float, first_signal: int = signal.SIGABRT) -> None:
        """Send `first_signal` to the tree now; SIGTERM after `grace_s`, SIGKILL `term_grace_s`
        later unless it has gone by then. Repeated calls only shorten the deadlines."""
        now = time.monotonic()
        if self._stop_signal_at is None:
            self._stop_signal_at = now
            self.signal_tree(first_signal)
        term_at = now + grace_s
        if self._term_at is None or term_at < self._term_at:
            self._term_at = term_at
            self._kill_at = term_at + self.term_grace_s

    def poll(self) -> int | None:
        """The command's exit code once nothing is left of its tree (the guard waits for that)."""
        if self._exit_code is not None:
            return self._exit_code
        now = time.monotonic()
        if self._term_at is not None and now >= self._term_at:
            self._term_at = None
            self.signal_tree(signal.SIGTERM)
        if self._kill_at is not None and now >= self._kill_at and self._term_at is None:
            self._kill_at = None
            self.signal_tree(signal.SIGKILL)
        code = self._popen.poll()
        if code is None:
            return None
        self._exit_code = 128 - code if code < 0 else code  # the guard itself was killed
        return self._exit_code

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval)
        return code

    def stop(self, grace_s: float, first_signal: int = signal.SIGABRT) -> int:
        """Stop and wait: `first_signal`, then SIGTERM after `grace_s`, then SIGKILL."""
        self.request_stop(grace_s, first_signal)
        code = self.wait()
        assert code is not None
        return code
