"""Fixtures that run the real `pubrun` binary and point Google's clients at it.

The server is started once per test session:

    $PUBRUN_BIN serve --listen 127.0.0.1:<free port> --data-dir <tmpdir>

(`PUBRUN_BIN` defaults to <repo>/target/debug/pubrun). We wait until
`GET /healthz` answers 200, export PUBSUB_EMULATOR_HOST so that
`google.cloud.pubsub_v1` clients talk to it, and stop it with SIGTERM at the
end. The server's stdout/stderr go to a log file; the part of it written while
a test ran is attached to that test's failure report, and the whole log is
printed when the server fails to start or to stop cleanly.

Every test gets its own project id (derived from the test name), so tests do
not see each other's topics and subscriptions.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import close_quietly

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "pubrun"
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
LOG_TAIL_BYTES = 20_000


@dataclass
class PubrunServer:
    proc: subprocess.Popen
    host: str
    port: int
    data_dir: Path
    log_path: Path
    argv: list = field(default_factory=list)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, start: int = 0, limit: int | None = None) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                data = f.read()
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
        if limit is not None and len(data) > limit:
            data = b"...(truncated)...\n" + data[-limit:]
        return data.decode("utf-8", "replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, wait; SIGKILL if it does not stop in time. Returns exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


def _start_server(
    binary: Path,
    workdir: Path,
    data_dir: Path | None = None,
    extra_args: list | None = None,
    healthy=None,
) -> PubrunServer:
    last_error = ""
    fixed_data_dir = data_dir
    for attempt in range(3):  # a freshly picked free port can be taken in between
        port = _free_port()
        data_dir = fixed_data_dir or workdir / f"data-{attempt}"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"pubrun-{time.strftime('%H%M%S')}-{port}.log"
        argv = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
        argv += extra_args or []
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("RUST_LOG", "info")
        env.setdefault("NO_COLOR", "1")  # plain log file
        env.pop("PUBSUB_EMULATOR_HOST", None)
        log = open(log_path, "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        server = PubrunServer(proc=proc, host="127.0.0.1", port=port, data_dir=data_dir, log_path=log_path, argv=argv)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        health = f"{server.base_url}/healthz"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if (healthy or _healthy)(health):
                return server
            time.sleep(0.1)
        code = proc.poll()
        if code is None:
            _stop(proc)
            last_error = (
                f"pubrun did not answer 200 on {health} within {STARTUP_TIMEOUT_S:.0f}s\n"
                f"command: {' '.join(argv)}\n--- server log ---\n{server.log_text(limit=LOG_TAIL_BYTES)}"
            )
            break  # a hang is not a port clash; do not retry
        log_text = server.log_text(limit=LOG_TAIL_BYTES)
        last_error = (
            f"pubrun exited with code {code} before becoming healthy\n"
            f"command: {' '.join(argv)}\n--- server log ---\n{log_text}"
        )
        if "in use" not in log_text.lower():
            break
    pytest.fail(last_error, pytrace=False)


_SERVER: PubrunServer | None = None


def pubrun_binary() -> Path:
    binary = Path(os.environ.get("PUBRUN_BIN", str(DEFAULT_BIN)))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"pubrun binary not found at {binary}: build it first (cargo build) or set PUBRUN_BIN",
            pytrace=False,
        )
    return binary


def start_pubrun(workdir: Path, data_dir: Path | None = None) -> PubrunServer:
    """Start a separate pubrun server (for tests that kill or restart it)."""
    return _start_server(pubrun_binary(), workdir, data_dir)


def stop_pubrun(server: PubrunServer, kill: bool = False) -> int | None:
    if kill:
        server.proc.kill()
        return server.proc.wait(timeout=10)
    return _stop(server.proc)


class TempPostgres:
    """A throwaway PostgreSQL cluster (Debian's server binaries; as the
    `postgres` user when we are root), like crates/store/src/testing.rs."""

    def __init__(self):
        versions = sorted(
            (int(p.name), p / "bin")
            for p in Path("/usr/lib/postgresql").glob("*")
            if p.name.isdigit() and (p / "bin" / "initdb").is_file()
        )
        if not versions:
            pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)", pytrace=False)
        self.bin = versions[-1][1]
        # Its own temp dir: the postgres user cannot enter our 0700 workdir.
        self.dir = Path(tempfile.mkdtemp(prefix="pubrun-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, user="postgres")
        self.port = _free_port()
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale", "C")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "-o", opts, "start")

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _answered_by(node: str):
    """A health check that also wants `x-pubrun-node: NODE` (cluster mode)."""

    def check(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200 and resp.headers.get("x-pubrun-node") == node
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    return check


def _start_cluster(binary: Path, workdir: Path):
    """PUBRUN_TEST_STORE=cluster: PostgreSQL and three servers on it. Returns
    (server the tests talk to, all servers, postgres): the tests talk to a
    standby, so every call is forwarded to the owner."""
    pg = TempPostgres()
    servers = []
    for name in ("a", "b", "c"):
        args = ["--store", pg.url, "--node-name", name]
        # a owns the state; b and c answer once they forward to it.
        servers.append(_start_server(binary, workdir, workdir / f"data-{name}", args, _answered_by("a")))
    return servers[1], servers, pg


@pytest.fixture(scope="session")
def pubrun_server(request):
    """The running pubrun server (one per test session). With
    PUBRUN_TEST_STORE=cluster: a standby of a three-server cluster on a
    throwaway PostgreSQL (calls are forwarded to the owner)."""
    global _SERVER
    binary = pubrun_binary()
    workdir = Path(tempfile.mkdtemp(prefix="pubrun-pytest-"))
    cluster = None
    if os.environ.get("PUBRUN_TEST_STORE") == "cluster":
        server, members, pg = _start_cluster(binary, workdir)
        cluster = (members, pg)
        _SERVER = members[0]  # failing tests get the owner's log
    else:
        server = _start_server(binary, workdir)
        _SERVER = server
    old_env = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = server.hostport
    try:
        yield server
    finally:
        _SERVER = None
        if old_env is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old_env
        died_early = server.proc.poll() is not None
        code = _stop(server.proc)
        if cluster is not None:
            members, pg = cluster
            for m in reversed(members):  # standbys first, the owner last
                if m is not server:
                    _stop(m.proc)
            pg.stop()
        if died_early or code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            how = "died during the tests" if died_early else "did not stop cleanly on SIGTERM"
            sys.stderr.write(
                f"\npubrun server {how} (exit code {code}); log {server.log_path}:\n"
                f"{server.log_text(limit=LOG_TAIL_BYTES)}\n"
            )
        elif request.session.testsfailed == 0:
            shutil.rmtree(workdir, ignore_errors=True)


def _project_id_for(nodeid: str) -> str:
    """A valid, unique project id for a test: t-<slug>-<hash>, <= 30 chars."""
    name = nodeid.split("::")[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:6]
    slug = slug.removeprefix("test-")[: 30 - 2 - 1 - len(digest)].strip("-")
    return f"t-{slug}-{digest}"


@pytest.fixture
def project(request, pubrun_server) -> str:
    """A project id unique to this test."""
    return _project_id_for(request.node.nodeid)


@pytest.fixture
def publisher(pubrun_server):
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient()
    yield client
    close_quietly(client.stop, lambda: client.transport.close())


@pytest.fixture
def subscriber(pubrun_server):
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    yield client
    close_quietly(client.close)


@pytest.fixture
def base_url(pubrun_server) -> str:
    return pubrun_server.base_url


# --- attach the server's log to failing tests ---------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._pubrun_log_start = _SERVER.log_size() if _SERVER is not None else 0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVER is not None:
        start = getattr(item, "_pubrun_log_start", 0)
        text = _SERVER.log_text(start=start, limit=LOG_TAIL_BYTES)
        alive = "running" if _SERVER.proc.poll() is None else f"EXITED with {_SERVER.proc.returncode}"
        report.sections.append(
            (f"pubrun server log during this test ({alive}; full log {_SERVER.log_path})", text or "<empty>")
        )
