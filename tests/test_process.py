"""Managed child processes: own process group, escalation, no orphans when the worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from workers.process import ManagedProcess

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _wait_for_file(path: Path, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# A child that handles SIGABRT as LLaMA-Factory does once its handler is in (or not at all, or
# ignores the stop signals), with a grandchild in a session of its own, as torchrun starts its
# ranks (so no process-group signal reaches it); both write their pids.
PARENT_AND_GRANDCHILD = """
    import os, signal, subprocess, sys, time
    behaviour = sys.argv[1]
    if behaviour == "abort-exits-0":
        signal.signal(signal.SIGABRT, lambda *_: sys.exit(0))
    elif behaviour == "deaf":
        for signum in (signal.SIGABRT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                  start_new_session=True)
    with open("pids.txt.tmp", "w") as out:
        out.write(f"{os.getpid()} {grandchild.pid}\\n")
    os.replace("pids.txt.tmp", "pids.txt")
    time.sleep(120)
"""


def _start(tmp_path: Path, behaviour: str, **kwargs) -> tuple[ManagedProcess, list[int]]:
    command = [sys.executable, "-c", textwrap.dedent(PARENT_AND_GRANDCHILD), behaviour]
    process = ManagedProcess(command, dict(os.environ), tmp_path, tmp_path / "stdout.log", **kwargs)
    pids = [int(pid) for pid in _wait_for_file(tmp_path / "pids.txt").split()]
    return process, pids


def test_output_goes_to_the_log_and_the_exit_code_comes_back(tmp_path: Path) -> None:
    process = ManagedProcess(_python("print('hello'); raise SystemExit(3)"), dict(os.environ), tmp_path,
                             tmp_path / "out.log")
    assert process.wait(timeout=10) == 3
    assert (tmp_path / "out.log").read_text() == "hello\n"
    assert os.getpgid(os.getpid()) != process.pid  # it had a group of its own


def test_a_handled_sigabrt_ends_it_gracefully(tmp_path: Path) -> None:
    process, pids = _start(tmp_path, "abort-exits-0")
    started = time.monotonic()
    assert process.stop(grace_s=5) == 0
    assert time.monotonic() - started < 2
    assert _wait_gone(pids) == []  # the grandchild too, though in a session of its own


def test_an_unhandled_sigabrt_kills_with_134(tmp_path: Path) -> None:
    process, pids = _start(tmp_path, "default")
    assert process.stop(grace_s=5) == 134  # as LLaMA-Factory does before its handler is in
    assert _wait_gone(pids) == []


def test_escalation_reaches_sigkill_on_time_and_takes_the_grandchildren(tmp_path: Path) -> None:
    process, pids = _start(tmp_path, "deaf", term_grace_s=0.5)
    started = time.monotonic()
    process.request_stop(grace_s=0.6)
    time.sleep(0.3)
    # The deaf parent ignored SIGABRT (its plain grandchild did not: the signal went to the tree).
    assert process.poll() is None and _alive(pids[0])
    code = process.wait(timeout=10)
    elapsed = time.monotonic() - started
    assert code == 128 + signal.SIGKILL  # SIGTERM ignored too, so SIGKILL did it
    assert 1.0 <= elapsed < 2.0, elapsed  # grace 0.6 s + term grace 0.5 s
    assert _wait_gone(pids) == []


def test_an_orphan_left_behind_is_adopted_then_killed(tmp_path: Path) -> None:
    command = _python("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        print(child.pid, flush=True)
    """)
    process = ManagedProcess(command, dict(os.environ), tmp_path, tmp_path / "out.log")
    orphan = int(_wait_for_file(tmp_path / "out.log"))
    time.sleep(0.5)
    assert psutil.Process(orphan).ppid() == process.pid  # adopted by the guard, not by init
    started = time.monotonic()
    assert process.wait(timeout=10) == 0  # the command's code, once the tree is gone
    assert 2 < time.monotonic() - started < 5  # the guard's grace for strays
    assert not _alive(orphan)


WORKER = """
    import sys, time
    sys.path.insert(0, {root!r})
    from workers.process import ManagedProcess
    import os, threading
    def launch():
        ManagedProcess([sys.executable, "-c", {child!r}, "default"], dict(os.environ), {cwd!r},
                       {cwd!r} + "/stdout.log")
    # Launched from a thread that ends at once: the child must outlive it.
    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    print("launched", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_group_dies_with_the_worker_even_by_kill_9(tmp_path: Path, signum: int) -> None:
    script = WORKER.format(root=str(PROJECT_ROOT), child=textwrap.dedent(PARENT_AND_GRANDCHILD), cwd=str(tmp_path))
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == "launched\n"
        pids = [int(pid) for pid in _wait_for_file(tmp_path / "pids.txt").split()]
        time.sleep(0.5)
        assert all(_alive(pid) for pid in pids)  # the launching thread's end killed nothing
        worker.send_signal(signum)
        worker.wait(timeout=10)
        assert _wait_gone(pids, timeout_s=3) == []
    finally:
        worker.kill()
        worker.wait()
