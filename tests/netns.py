"""Multi-host integration tests on one machine: each "host" is a Linux network namespace.

    with netns_cluster(["panel", "worker-a"]) as cluster:
        panel, worker = cluster.host("panel"), cluster.host("worker-a")
        redis_url = cluster.start_redis(panel, password="pw")
        worker.popen([...], env={...}, log_path=..., hide=[panel_data_dir])

Topology: a bridge in the root namespace holds ``cluster.root_address`` (10.213.N.1); every host
gets one veth pair, its end moved into the host's namespace as ``eth0`` with 10.213.N.2, .3, …
and ``lo`` up. Hosts reach each other through the bridge (layer 2, no IP forwarding) and the
test process reaches them through the bridge's connected route. Namespaces have no default
route, so nothing they send can leave the machine.

Names carry ``tbn<pid>`` (the owning test process) so that a later run can delete what a crashed
run left behind, and only when that pid is dead. Needs root, ``ip`` (iproute2) and ``unshare``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["Cluster", "Host", "netns_cluster", "wait_for_port", "is_running", "PREFIX"]

PREFIX = "tbn"
# tbn<pid>n<seq>-<host> (namespace), tbn<pid>b<seq> (bridge), tbn<pid>v<seq> (veth, root side).
_OWNED_NAME = re.compile(rf"^{PREFIX}(\d+)[nbv]\d+")
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
_MAX_IFNAME = 15  # IFNAMSIZ - 1
_NETNS_DIR = Path("/run/netns")
# Serialises "pick a free /24 and claim it" between test processes running at the same time.
_LOCK_PATH = Path(tempfile.gettempdir()) / "tuneboard-netns.lock"

_SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(name: str) -> str:
    # Absolute paths: a child's env may carry any PATH (or none).
    found = shutil.which(name, path=_SEARCH_PATH)
    if not found:
        raise RuntimeError(f"{name!r} not found; the netns harness needs iproute2 and util-linux")
    return found


_IP, _UNSHARE, _MOUNT = _tool("ip"), _tool("unshare"), _tool("mount")
_SH = "/bin/sh"

_sequence = itertools.count()  # unique names within this process, even for nested clusters
_live_clusters: set[Cluster] = set()


# --------------------------------------------------------------------------- small helpers


def _wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate``; bounded both in attempts and in wall-clock time."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return predicate()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_IP, *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _ip_json(*args: str) -> list[dict]:
    return json.loads(_ip("-j", *args).stdout or "[]")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 here may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_port(address: str, port: int, *, timeout: float = 10.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Wait until a TCP server accepts on address:port (from the test process); fail fast if
    ``proc`` exits first."""
    def accepting() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
            return True
        return False

    if not _wait_until(accepting, timeout=timeout, interval=0.1):
        raise TimeoutError(f"nothing listening on {address}:{port} after {timeout} s")


def _netns_pids(namespace: str) -> list[int]:
    """Every live process whose network namespace is ``namespace`` (what ``ip netns pids`` does)."""
    try:
        target = os.stat(_NETNS_DIR / namespace)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            ns = os.stat(f"/proc/{entry}/ns/net")
            if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(entry))
    return pids


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _owned_names() -> tuple[list[str], list[str]]:
    """(namespaces, root-namespace links) whose names carry our prefix."""
    namespaces = [entry["name"] for entry in _ip_json("netns", "list")]
    links = [entry["ifname"] for entry in _ip_json("link", "show")]
    return ([n for n in namespaces if _OWNED_NAME.match(n)],
            [n for n in links if _OWNED_NAME.match(n)])


def _owner_pid(name: str) -> int:
    match = _OWNED_NAME.match(name)
    assert match, name
    return int(match.group(1))


def _delete_namespace(namespace: str) -> None:
    # Processes keep a deleted namespace (and its veth) alive: kill them first.
    _signal_pids(_netns_pids(namespace), signal.SIGKILL)
    _wait_until(lambda: not _netns_pids(namespace), timeout=3)
    _ip("netns", "delete", namespace, check=False)


def _delete_link(name: str) -> None:
    _ip("link", "delete", name, check=False)


def remove_stale_leftovers() -> list[str]:
    """Delete namespaces and links of earlier runs whose owning process is dead. Returns names."""
    namespaces, links = _owned_names()
    removed = []
    for namespace in namespaces:
        if not _pid_alive(_owner_pid(namespace)):
            _delete_namespace(namespace)
            removed.append(namespace)
    for link in links:
        if not _pid_alive(_owner_pid(link)):
            _delete_link(link)
            removed.append(link)
    return removed


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks already routed or addressed on this machine (the default route aside)."""
    taken = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        if route.get("dst") not in (None, "default"):
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
    for link in _ip_json("-4", "addr", "show"):
        for addr in link.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return taken


def _free_subnet() -> ipaddress.IPv4Network:
    taken = _taken_networks()
    candidates = list(_SUPERNET.subnets(new_prefix=24))[1:-1]
    start = os.getpid() % len(candidates)  # spread concurrent runs out
    for candidate in candidates[start:] + candidates[:start]:
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise RuntimeError(f"no free /24 left in {_SUPERNET}")


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    with open(_LOCK_PATH, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _disable_ipv6(ifname: str, namespace: str | None = None) -> None:
    # Keeps the links quiet (no router solicitations / DAD / MLD): the harness is IPv4 only.
    # /proc/sys/net shows the namespace of the writer, hence the write from inside it.
    setting = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if namespace is None:
        with contextlib.suppress(FileNotFoundError):  # kernel without IPv6
            Path(setting).write_text("1")
        return
    subprocess.run([_IP, "netns", "exec", namespace,
                    _SH, "-c", '[ ! -e "$1" ] || echo 1 > "$1"', "sh", setting],
                   capture_output=True, timeout=15)


# Runs the command with the hidden paths covered by empty tmpfs mounts, in a private mount
# namespace so nothing propagates back. Arguments: MOUNT N PATH... CMD...
_HIDE_SCRIPT = r"""
mount_bin=$1; count=$2; shift 2
while [ "$count" -gt 0 ]; do
    "$mount_bin" -t tmpfs -o mode=0755 tuneboard-hidden "$1" || exit 125
    shift; count=$((count - 1))
done
exec "$@"
"""


# --------------------------------------------------------------------------- hosts


class Host:
    """One network namespace; every process started through it is tracked for teardown."""

    def __init__(self, name: str, namespace: str, address: str, veth: str) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self.veth = veth  # root-namespace end of the host's link
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, netns={self.namespace})"

    def _argv(self, cmd: Sequence[str], hide: Sequence[Path]) -> list[str]:
        argv = [_IP, "netns", "exec", self.namespace]
        if hide:
            resolved = [Path(path).resolve() for path in hide]
            for path in resolved:
                path.mkdir(parents=True, exist_ok=True)  # a mount point must exist
            # Deepest first: a parent's tmpfs mounted earlier would hide a nested mount point.
            paths = [str(p) for p in sorted(resolved, key=lambda p: len(p.parts), reverse=True)]
            argv += [_UNSHARE, "--mount", "--propagation", "private",
                     _SH, "-c", _HIDE_SCRIPT, "tuneboard-hide", _MOUNT, str(len(paths)), *paths]
        return argv + [str(part) for part in cmd]

    @staticmethod
    def _env(env: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ if env is None else env)
        env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        return env

    def popen(self, cmd: Sequence[str], *, env: dict[str, str], log_path: Path,
              cwd: Path | None = None, hide: Sequence[Path] = ()) -> subprocess.Popen:
        """Start ``cmd`` in this host, stdout+stderr appended to ``log_path``, in its own session."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(self._argv(cmd, hide), env=self._env(env), cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def run(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 30,
            hide: Sequence[Path] = (), cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in this host and wait; output captured as text. ``env=None`` inherits
        the test process's environment. On timeout the whole process group is killed."""
        proc = subprocess.Popen(self._argv(cmd, hide), env=self._env(env), cwd=cwd,
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._procs.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise
        finally:
            self._procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def pids(self) -> list[int]:
        """Every live process inside this host (including ones that left their process group)."""
        return _netns_pids(self.namespace)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process the harness started here (their groups, and anything else still
        in the namespace, e.g. a redis from ``start_redis``). With SIGKILL, waits until they are
        gone."""
        for proc in self._procs:
            _kill_group(proc, sig)
        _signal_pids(self.pids(), sig)
        if sig == signal.SIGKILL:
            _wait_until(self._gone, timeout=5)

    def _gone(self) -> bool:
        return all(proc.poll() is not None for proc in self._procs) and not self.pids()

    def _reap(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    # Only while the leader is unreaped: then its pid (= the group id) cannot have been reused.
    # Group members that outlive the leader are still found through the namespace.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


# --------------------------------------------------------------------------- cluster


class Cluster:
    """Hosts on one bridge; use through :func:`netns_cluster`."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.root_address = ""
        self.bridge = ""
        self._namespaces: list[str] = []  # created so far, for a teardown after a partial setup
        self._links: list[str] = []
        self._redis_ports: dict[str, int] = {}
        self._scratch = Path(tempfile.mkdtemp(prefix="tuneboard-netns-"))

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def __repr__(self) -> str:
        return f"Cluster({self.subnet}, hosts={list(self.hosts)})"

    def _name(self, kind: str, suffix: str = "") -> str:
        name = f"{self.tag}{kind}{next(_sequence)}{suffix}"
        if kind != "n" and len(name) > _MAX_IFNAME:
            raise RuntimeError(f"interface name too long: {name}")
        return name

    def _setup(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names) or not all(_HOST_NAME.match(n) for n in names):
            raise ValueError(f"host names must be unique and match {_HOST_NAME.pattern}: {names}")
        with _machine_lock():  # pick and claim the subnet atomically w.r.t. other test runs
            remove_stale_leftovers()
            self.subnet = _free_subnet()
            if len(names) > self.subnet.num_addresses - 3:
                raise ValueError(f"too many hosts for one /24: {len(names)}")
            self.bridge = self._name("b")
            _ip("link", "add", self.bridge, "type", "bridge")
            self._links.append(self.bridge)
            _disable_ipv6(self.bridge)
            self.root_address = str(self.subnet[1])
            _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(names):
            self.hosts[name] = self._add_host(name, str(self.subnet[2 + index]))

    def _add_host(self, name: str, address: str) -> Host:
        namespace, veth = self._name("n", f"-{name}"), self._name("v")
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _disable_ipv6("all", namespace)
        _disable_ipv6("default", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._links.append(veth)
        _disable_ipv6(veth)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        return Host(name, namespace, address, veth)

    def start_redis(self, host: Host, password: str, *, timeout: float = 10.0,
                    log_path: Path | None = None) -> str:
        """A fresh, memory-only redis-server inside ``host``, bound to its address and its own
        127.0.0.1, password required. Returns ``redis://:password@ADDRESS:PORT/0``.
        Its log goes to ``log_path`` (default: a scratch folder deleted at teardown)."""
        port = self._redis_ports.get(host.name, 6390)  # own port space per namespace
        self._redis_ports[host.name] = port + 1
        workdir = self._scratch / f"redis-{host.name}-{port}"
        workdir.mkdir()
        cmd = [_tool("redis-server"), "--bind", host.address, "127.0.0.1", "--port", str(port),
               "--requirepass", password, "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--dir", str(workdir)]
        log_path = Path(log_path or workdir / "redis.log")
        proc = host.popen(cmd, env={}, log_path=log_path)
        try:
            wait_for_port(host.address, port, timeout=timeout, proc=proc)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{log_path.read_text(errors='replace')[-2000:]}") from None
        return f"redis://:{urllib.parse.quote(password, safe='')}@{host.address}:{port}/0"

    def _stop_processes(self, grace: float) -> None:
        """SIGTERM everywhere at once, one bounded wait, then SIGKILL what is left."""
        hosts = list(self.hosts.values())
        for host in hosts:
            host.kill_all(signal.SIGTERM)
        _wait_until(lambda: all(host._gone() for host in hosts), timeout=grace)
        for host in hosts:
            if not host._gone():
                host.kill_all(signal.SIGKILL)
            host._reap()

    def close(self, grace: float = 3.0) -> None:
        """Stop every process, delete namespaces and links. Safe to call more than once."""
        problems = []
        try:
            self._stop_processes(grace)
        except Exception as error:  # keep tearing down the rest
            problems.append(f"stopping processes: {error!r}")
        for namespace in self._namespaces:
            _delete_namespace(namespace)
        for link in reversed(self._links):  # usually gone with their namespace already
            if Path(f"/sys/class/net/{link}").exists():
                _delete_link(link)
        mine = set(self._namespaces) | set(self._links)

        def leftovers() -> list[str]:
            return [name for names in _owned_names() for name in names if name in mine]

        # The kernel destroys a namespace (and its veth) asynchronously: allow it a moment.
        if not _wait_until(lambda: not leftovers(), timeout=3, interval=0.1):
            problems.append(f"still present: {leftovers()}")
        self._namespaces.clear()
        self._links.clear()
        shutil.rmtree(self._scratch, ignore_errors=True)
        _live_clusters.discard(self)
        if problems:
            raise RuntimeError("netns teardown incomplete: " + "; ".join(problems))


@atexit.register
def _close_forgotten_clusters() -> None:
    # A cluster whose `with` never finished (e.g. a fixture generator dropped): clean up at exit.
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.close(grace=1.0)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a cluster lives, SIGTERM unwinds (finally blocks run) instead of killing us outright."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_DFL:
            previous = None  # someone else owns SIGTERM: leave it alone
        else:
            signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def netns_cluster(names: Sequence[str]) -> Iterator[Cluster]:
    """Hosts named ``names`` on one private link; everything is torn down on exit."""
    cluster = Cluster()
    _live_clusters.add(cluster)
    with _sigterm_raises():
        try:
            cluster._setup(list(names))
            yield cluster
        finally:
            cluster.close()
