"""Root of a managed child's process tree: runs one command, adopts every orphan of that tree
(PR_SET_CHILD_SUBREAPER) and exits only when the whole tree is gone; should the worker that
started it die, even by kill -9, it kills the whole tree.

Why a tree, not a process group: torch elastic (torchrun) starts each rank in a session of its
own, so neither a process-group signal nor PR_SET_PDEATHSIG (direct child only) reaches them.

Usage: python -I group_guard.py PARENT_PID -- COMMAND [ARG...]
Exits with the command's exit code (128 + N when a signal N killed it, as a shell reports it).

Standalone on purpose (stdlib only, started with -I): it must start in milliseconds and must
not import the app. workers/process.py starts it with PR_SET_PDEATHSIG=DEATH_SIGNAL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

# The worker's death reaches us as this signal (set by the parent through PR_SET_PDEATHSIG).
# Nothing else sends it, so it can mean only "the worker is gone".
DEATH_SIGNAL = signal.SIGUSR2
STOP_SIGNALS = (signal.SIGABRT, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_CHILD_SUBREAPER = 36
# Descendants still running this long after the command exited on its own are killed.
STRAY_GRACE_S = 3.0

_stopping = False


def descendants(root: int) -> list[int]:
    """Every process below `root`, parents before children (from /proc: stdlib only)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def kill_tree(*_args: object) -> None:
    for pid in descendants(os.getpid()):  # parents first: none is left to restart a child
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(0, signal.SIGKILL)  # ourselves included


def _note_stop(*_args: object) -> None:
    """A stop signal is meant for the command (the worker signals the whole tree); from now on
    the worker's escalation decides how long its descendants may take. A Python handler rather
    than SIG_IGN: an ignored disposition would be inherited across exec by the command."""
    global _stopping
    _stopping = True


def main(argv: list[str]) -> int:
    parent_pid = int(argv[1])
    command = argv[argv.index("--") + 1:]
    signal.signal(DEATH_SIGNAL, kill_tree)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note_stop)
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if os.getppid() != parent_pid:  # the worker died before our handler was installed
        kill_tree()
    child = os.posix_spawnp(command[0], command, os.environ)
    exit_code: int | None = None
    child_exited_at = 0.0
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if exit_code is None else os.WNOHANG)
        except ChildProcessError:
            return exit_code if exit_code is not None else 0  # nothing left of the tree
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            exit_code = 128 - code if code < 0 else code
            child_exited_at = time.monotonic()
        elif pid == 0:  # the command is gone, some of its descendants are not
            if not _stopping and time.monotonic() - child_exited_at > STRAY_GRACE_S:
                for stray in descendants(os.getpid()):
                    try:
                        os.kill(stray, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
