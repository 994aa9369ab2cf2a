"""The multi-host harness itself: reachability across namespaces, hidden folders, a password
Redis on one host used from another, and teardown (also after an exception, also of crashed runs)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.netns import Cluster, Host, is_running, netns_cluster, wait_for_port

HTTP_PORT = 8000  # each namespace has its own port space, so a fixed port cannot clash
# A pid above the kernel's PID_MAX_LIMIT (2**22): a "crashed run" whose owner is surely dead.
DEAD_OWNER_PID = 2**22 + 1

# Never let a proxy setting send test traffic off the machine.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(sys.argv[1], timeout=5).read().decode())
"""


def _ip_names(*args: str) -> set[str]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return {entry.get("name") or entry.get("ifname") for entry in json.loads(out or "[]")}


def _footprint(cluster: Cluster) -> tuple[set[str], set[str]]:
    """The namespaces and root-side links a cluster created."""
    hosts = cluster.hosts.values()
    return {h.namespace for h in hosts}, {cluster.bridge, *(h.veth for h in hosts)}


def _assert_torn_down(namespaces: set[str], links: set[str], pids: list[int]) -> None:
    assert not namespaces & _ip_names("netns", "list")
    assert not links & _ip_names("link", "show")
    assert [pid for pid in pids if is_running(pid)] == []


def _start_sleeper(host: Host, tmp_path: Path) -> subprocess.Popen:
    return host.popen(["sleep", "300"], env={}, log_path=tmp_path / f"{host.name}-sleep.log")


def test_http_server_in_one_host_is_reachable_from_another_and_from_the_test_process(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from panel")

    with netns_cluster(["panel", "worker-a"]) as cluster:
        panel, worker = cluster.host("panel"), cluster.host("worker-a")
        server = panel.popen(
            [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", panel.address],
            env={}, log_path=tmp_path / "http.log", cwd=site,
        )
        wait_for_port(panel.address, HTTP_PORT, proc=server)
        url = f"http://{panel.address}:{HTTP_PORT}/hello.txt"

        fetched = worker.run([sys.executable, "-c", FETCH, url], env={})
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.strip() == "hello from panel"
        assert _direct.open(url, timeout=5).read() == b"hello from panel"

        # The other direction: a host reaches a server of the test process on root_address.
        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"hello from root")

            def log_message(self, *args):
                pass

        with http.server.HTTPServer((cluster.root_address, 0), Hello) as root_server:
            thread = threading.Thread(target=root_server.serve_forever, daemon=True)
            thread.start()
            try:
                root_url = f"http://{cluster.root_address}:{root_server.server_port}/"
                fetched = worker.run([sys.executable, "-c", FETCH, root_url], env={})
            finally:
                root_server.shutdown()
        assert fetched.stdout.strip() == "hello from root", fetched.stderr


def test_hidden_folder_is_empty_for_that_process_tree_only(tmp_path):
    panel_data = tmp_path / "panel-data"
    panel_data.mkdir()
    (panel_data / "secret.db").write_text("panel only")
    list_dir = [sys.executable, "-c", "import os, sys; print(sorted(os.listdir(sys.argv[1])))"]

    with netns_cluster(["panel", "worker-a"]) as cluster:
        panel, worker = cluster.host("panel"), cluster.host("worker-a")

        hidden = worker.run([*list_dir, str(panel_data)], env={}, hide=[panel_data])
        assert (hidden.returncode, hidden.stdout.strip()) == (0, "[]"), hidden.stderr
        assert panel.run([*list_dir, str(panel_data)], env={}).stdout.strip() == "['secret.db']"

        # Writes land in the worker's private tmpfs, like a disk of another machine.
        wrote = worker.run(["sh", "-c", 'echo x > "$1/worker-only"', "sh", str(panel_data)],
                           env={}, hide=[panel_data])
        assert wrote.returncode == 0, wrote.stderr
        assert sorted(p.name for p in panel_data.iterdir()) == ["secret.db"]

        # A folder that does not exist yet is created as the mount point.
        fresh = tmp_path / "not-yet"
        assert worker.run([*list_dir, str(fresh)], env={}, hide=[fresh]).stdout.strip() == "[]"

    assert "tuneboard-hidden" not in Path("/proc/self/mounts").read_text()


def test_env_is_passed_exactly_plus_path(tmp_path):
    with netns_cluster(["solo"]) as cluster:
        result = cluster.host("solo").run(["env", "-0"], env={"TUNEBOARD_X": "1"})
    env = dict(line.split("=", 1) for line in result.stdout.split("\0") if line)
    assert set(env) == {"TUNEBOARD_X", "PATH"}
    assert env["TUNEBOARD_X"] == "1"


REDIS_CHECK = """
import json, sys, redis
authed_url, anonymous_url = sys.argv[1:]
try:
    redis.Redis.from_url(anonymous_url, socket_timeout=5).set("k", "v")
    anonymous = "accepted"
except redis.exceptions.AuthenticationError as error:
    anonymous = "refused: " + str(error)
client = redis.Redis.from_url(authed_url, socket_timeout=5)
client.set("k", "from-worker")
print(json.dumps({"anonymous": anonymous, "value": client.get("k").decode()}))
"""


def test_redis_needs_its_password_and_serves_another_host(tmp_path):
    with netns_cluster(["panel", "worker-a"]) as cluster:
        panel, worker = cluster.host("panel"), cluster.host("worker-a")
        url = cluster.start_redis(panel, password="s3cret/pw")
        assert url.startswith(f"redis://:s3cret%2Fpw@{panel.address}:")
        port = url.rsplit(":", 1)[1].split("/")[0]

        result = worker.run([sys.executable, "-c", REDIS_CHECK, url,
                             f"redis://{panel.address}:{port}/0"], env={})
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome["anonymous"].startswith("refused"), outcome
        assert outcome["value"] == "from-worker"

        # Inside its own host it also answers on 127.0.0.1.
        local_url = url.replace(panel.address, "127.0.0.1")
        local = panel.run([sys.executable, "-c", REDIS_CHECK, local_url,
                           f"redis://127.0.0.1:{port}/0"], env={})
        assert json.loads(local.stdout)["value"] == "from-worker", local.stderr


ESCAPE_GROUP = """
import os, subprocess, sys
child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # leaves our process group
open(sys.argv[1], "w").write(str(child.pid))
os.execvp("sleep", ["sleep", "300"])
"""


def _read_when_written(path: Path, writer: subprocess.Popen) -> str:
    for _ in range(100):  # bounded: about 5 s at most
        if path.exists() and (text := path.read_text()):
            return text
        assert writer.poll() is None, f"writer exited with {writer.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def test_leaving_the_block_kills_processes_and_deletes_namespaces_and_links(tmp_path):
    escaped_pid_file = tmp_path / "escaped.pid"
    with netns_cluster(["panel", "worker-a"]) as cluster:
        panel, worker = cluster.host("panel"), cluster.host("worker-a")
        cluster.start_redis(panel, password="pw")
        leader = worker.popen([sys.executable, "-c", ESCAPE_GROUP, str(escaped_pid_file)],
                              env={}, log_path=tmp_path / "escape.log")
        sleeper = _start_sleeper(panel, tmp_path)
        escaped_pid = int(_read_when_written(escaped_pid_file, leader))
        pids = [leader.pid, sleeper.pid, escaped_pid, *panel.pids()]
        assert all(is_running(pid) for pid in pids)
        namespaces, links = _footprint(cluster)
        assert namespaces <= _ip_names("netns", "list")
        subnet = str(cluster.subnet)

    _assert_torn_down(namespaces, links, pids)
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert subnet not in routes


def test_teardown_also_happens_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="test body failed"):
        with netns_cluster(["solo"]) as cluster:
            sleeper = _start_sleeper(cluster.host("solo"), tmp_path)
            namespaces, links = _footprint(cluster)
            raise RuntimeError("test body failed")
    _assert_torn_down(namespaces, links, [sleeper.pid])
    assert sleeper.returncode is not None


def test_kill_all_stops_one_host_and_leaves_the_others_running(tmp_path):
    with netns_cluster(["worker-a", "worker-b"]) as cluster:
        worker_a, worker_b = cluster.host("worker-a"), cluster.host("worker-b")
        victim, survivor = _start_sleeper(worker_a, tmp_path), _start_sleeper(worker_b, tmp_path)

        worker_a.kill_all()

        assert victim.returncode == -9
        assert worker_a.pids() == []
        assert survivor.poll() is None
        # The host stays usable, e.g. to restart a worker.
        assert worker_a.run(["true"], env={}).returncode == 0


def test_leftovers_of_a_dead_run_are_removed_and_live_runs_are_left_alone(tmp_path):
    stale_ns, stale_bridge = f"tbn{DEAD_OWNER_PID}n0-stale", f"tbn{DEAD_OWNER_PID}b0"
    live_ns = "tbn1n0-keep"  # pid 1 is always alive: must not be touched
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "netns", "add", live_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_bridge, "type", "bridge"], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale_ns, "sleep", "300"],
                              start_new_session=True)
    try:
        with netns_cluster(["fresh"]):
            pass
        assert orphan.wait(timeout=5) == -9
        assert stale_ns not in _ip_names("netns", "list")
        assert stale_bridge not in _ip_names("link", "show")
        assert live_ns in _ip_names("netns", "list")
    finally:
        orphan.kill()
        orphan.wait(timeout=5)
        for name in (stale_ns, live_ns):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["ip", "link", "delete", stale_bridge], capture_output=True)
