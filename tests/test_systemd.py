"""The systemd units in `systemd/`, checked without a running systemd.

There is no systemd as PID 1 here, so no unit is started by systemd. Instead:

- `systemd-analyze verify` must accept every unit without a word (it exits 0 even on an
  unknown directive, so any output fails), and `systemd-analyze security --offline=true`
  must rate every unit at `MAX_EXPOSURE` or better;
- the processes speak the notify protocol to a socket the test opens, as systemd would:
  `READY=1` once they serve, `WATCHDOG=1` every `WATCHDOG_USEC / 2`, `STOPPING=1` on SIGTERM;
- each unit's `ExecStartPre=` and `ExecStart=` command lines, read from the unit file, are run
  with the environment systemd gives them (`STATE_DIRECTORY`, `CREDENTIALS_DIRECTORY` holding
  the unit's `LoadCredential=` files, its `Environment=` lines, cwd `/`): the server serves
  and keeps its data in the state directory, the forwarder sends it upstream with the key
  from the credentials directory;
- what the sandbox forbids is not needed: every system call the processes make is in the
  unit's `SystemCallFilter=`, every socket in its `RestrictAddressFamilies=` (traced with
  strace), and they work with writable-executable memory refused (`MemoryDenyWriteExecute=`,
  as the kernel's PR_SET_MDWE).

`/usr/local/bin/collector` in the units stands for this virtualenv's `collector` script.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from collector.settings import Settings

from conftest import ROOT, event, free_port, stored_events, wait_until_serving
from upstream import Upstream

UNITS_DIR = ROOT / "systemd"
UNIT_NAMES = ("collector-server.service", "collector-forwarder.service")
INSTALLED = "/usr/local/bin/collector"
COLLECTOR = Path(sys.executable).parent / "collector"  # the venv's console script
BINARY = ROOT / "dist" / "collector"  # scripts/build-binary's one-file executable
MAX_EXPOSURE = 2.0
# What systemd passes to every service, whatever the caller's environment.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UPSTREAM_KEY = "traffical_sk_from_the_credential"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


# -- unit files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A unit file's directives, in order, per section (repeated keys kept)."""

    path: Path
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def read(cls, path: Path) -> Unit:
        sections: dict[str, list[tuple[str, str]]] = {}
        current: list[tuple[str, str]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            assert not line.endswith("\\"), f"{path.name}: continuation lines are not parsed"
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not a directive: {raw!r}"
            current.append((key.strip(), value.strip()))
        return cls(path, sections)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [value for name, value in self.sections.get(section, []) if name == key]

    def value(self, key: str, section: str = "Service") -> str:
        values = self.values(key, section)
        assert values, f"{self.path.name}: no {key}= in [{section}]"
        return values[-1]

    def command(self, key: str) -> list[str]:
        """The command line of the one `key=` (ExecStart, ExecStartPre), for this venv."""
        (line,) = self.values(key)
        argv = shlex.split(line.lstrip("-@:+!"))
        assert argv[0] == INSTALLED, f"{self.path.name}: {key} runs {argv[0]}, not {INSTALLED}"
        return [str(COLLECTOR), *argv[1:]]

    def environment(self) -> dict[str, str]:
        """The variables of its `Environment=` lines."""
        variables: dict[str, str] = {}
        for line in self.values("Environment"):
            for assignment in shlex.split(line):
                name, _, value = assignment.partition("=")
                variables[name] = value
        return variables

    def credentials(self) -> dict[str, str]:
        """`LoadCredential=` id -> source path."""
        credentials = {}
        for line in self.values("LoadCredential"):
            credential, _, source = line.partition(":")
            credentials[credential] = source
        return credentials

    def watchdog_usec(self) -> int:
        match = re.fullmatch(r"(\d+)(s|min)?", self.value("WatchdogSec"))
        assert match, f"{self.path.name}: WatchdogSec= in a form this test does not read"
        return int(match[1]) * (60 if match[2] == "min" else 1) * 1_000_000


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    return {name: Unit.read(UNITS_DIR / name) for name in UNIT_NAMES}


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _for_this_host(unit: Path, directory: Path) -> Path:
    """A copy of `unit` in `directory` whose commands run this venv's collector (verify
    requires every ExecStart= executable to exist)."""
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED, str(COLLECTOR)))
    return copy


def test_units_share_the_user_and_the_data_directory(units: dict[str, Unit]) -> None:
    server, forwarder = units["collector-server.service"], units["collector-forwarder.service"]
    for unit in units.values():
        assert unit.value("Type") == "notify"
        assert unit.value("StateDirectory") == "collector"
        assert unit.value("Restart") == "on-failure"
        assert unit.values("WatchdogSec")
    # One user and one state directory: the forwarder drains the queue the server fills.
    assert server.value("User") == forwarder.value("User") != "root"
    assert server.command("ExecStart")[1:] == ["serve"]
    assert forwarder.command("ExecStart")[1:] == ["forward"]
    assert forwarder.credentials() == {"upstream-key": "/etc/collector/upstream-key"}
    assert forwarder.environment()["COLLECTOR_UPSTREAM_KEY_FILE"] == "upstream-key"
    assert not server.values("LoadCredential")  # the server never holds an upstream key
    # The forwarder may take stop_timeout_seconds to finish its requests on SIGTERM.
    stop_timeout = Settings.model_fields["stop_timeout_seconds"].default
    assert float(forwarder.value("TimeoutStopSec").removesuffix("s")) > stop_timeout + 5


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_analyze_verify_accepts_the_unit(name: str, tmp_path: Path) -> None:
    unit = _for_this_host(UNITS_DIR / name, tmp_path)
    done = _systemd_analyze("verify", "--man=no", "--recursive-errors=no", str(unit))
    # verify exits 0 after warnings such as "Unknown key": any output is a failure.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_systemd_analyze
def test_systemd_analyze_verify_would_report_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelled directive and a bad value are reported."""
    unit = _for_this_host(UNITS_DIR / "collector-server.service", tmp_path)
    text = unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    unit.write_text(text.replace("RestartSec=5s", "RestartSec=soon"))
    done = _systemd_analyze("verify", "--man=no", "--recursive-errors=no", str(unit))
    assert "Unknown key 'ProtectClok'" in done.stderr
    assert "RestartSec" in done.stderr or "soon" in done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_analyze_security_rates_the_unit_safe_enough(name: str) -> None:
    done = _systemd_analyze("security", "--offline=true", str(UNITS_DIR / name))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    exposure = float(match[1])
    failing = [line for line in done.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, "\n".join(failing)


# -- the notify protocol ---------------------------------------------------------------------


@dataclass
class Notification:
    at: float  # time.monotonic()
    pid: int  # the sender, as the kernel tells it (SCM_CREDENTIALS)
    message: str


@dataclass
class NotifySocket:
    """The datagram socket systemd listens on for a Type=notify service."""

    path: Path
    received: list[Notification] = field(default_factory=list)
    _sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def close(self) -> None:
        self._sock.close()

    def wait_for(self, message: str, timeout: float, process: subprocess.Popen[bytes]) -> int:
        """Receive until `message` arrives anew (returns its sender's pid); fail if `process`
        exits or time runs out."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            exited = process.poll() is not None
            # After an exit, one more look: it may have sent `message` just before.
            for notification in self.receive(0.2 if exited else min(left, 0.2)):
                if notification.message == message:
                    return notification.pid
            if exited:
                raise AssertionError(f"exited ({process.returncode}) before {message}")
        raise AssertionError(f"no {message} in {timeout} s; got {self.messages()}")

    def receive(self, seconds: float) -> list[Notification]:
        """Whatever arrives in the next `seconds`."""
        new: list[Notification] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            now = time.monotonic()
            new += [Notification(now, pid, line) for line in data.decode().splitlines()]
        self.received += new
        return new

    def messages(self) -> list[str]:
        return [n.message for n in self.received]


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # Not in tmp_path: a socket path must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        sock = NotifySocket(Path(directory) / "notify")
        yield sock
        sock.close()


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` started from `/` (as systemd does) with exactly `env`, in a process group of its
    own; at the end whatever is left of the group (wrappers, children) is stopped."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, cwd="/", env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT_S)
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def as_main_process(argv: list[str]) -> list[str]:
    """`argv` with WATCHDOG_PID set to its own pid, as systemd sets it for the main process."""
    return ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv]


def stop(process: subprocess.Popen[bytes], log: Path, pid: int | None = None) -> None:
    """SIGTERM `pid` (default: the process), then expect `process` to exit 0."""
    os.kill(pid or process.pid, signal.SIGTERM)
    try:
        code = process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"did not stop on SIGTERM:\n{log.read_text()}") from None
    assert code == 0, log.read_text()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def base_env(state: Path, **more: str) -> dict[str, str]:
    """What systemd gives a service (nothing of the test's environment) plus `more`."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {
        "PATH": SYSTEMD_PATH,
        "LANG": "C.UTF-8",
        "STATE_DIRECTORY": str(state),
        **more,
    }


@functools.cache
def _fresh_binary() -> str | None:
    """Why dist/collector cannot be used: not built, or older than the sources."""
    if not BINARY.exists():
        return "dist/collector not built (scripts/build-binary)"
    sources = [ROOT / "cli.py", *ROOT.glob("collector/*.py"), *ROOT.glob("forwarder/*.py")]
    if BINARY.stat().st_mtime < max(source.stat().st_mtime for source in sources):
        return "dist/collector is older than the sources (scripts/build-binary)"
    return None


EXECUTABLES = [
    pytest.param(COLLECTOR, id="venv"),
    pytest.param(
        BINARY,
        id="one-file",
        marks=pytest.mark.skipif(_fresh_binary() is not None, reason=_fresh_binary() or ""),
    ),
]


@pytest.mark.parametrize("executable", EXECUTABLES)
@pytest.mark.parametrize("command", ["serve", "forward"])
def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    command: str,
    executable: Path,
    notify_socket: NotifySocket,
    units: dict[str, Unit],
    tmp_path: Path,
) -> None:
    port = free_port()
    env = base_env(
        tmp_path / "state",
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        COLLECTOR_PORT=str(port),
        TMPDIR=str(tmp_path),  # where the one-file build unpacks (PrivateTmp= under systemd)
    )
    log = tmp_path / f"{command}.log"
    with running(as_main_process([str(executable), command]), env, log) as process:
        sender = notify_socket.wait_for("READY=1", START_TIMEOUT_S, process)
        if command == "serve":  # READY=1 means serving: no polling needed
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        if executable == COLLECTOR:
            assert sender == process.pid  # what NotifyAccess=main would accept
        else:
            # PyInstaller's bootloader (the main process) runs the collector as its child:
            # the units' NotifyAccess=all is what makes systemd take its messages.
            for unit in units.values():
                assert unit.value("NotifyAccess") == "all"
        pings = [n for n in notify_socket.receive(2.2) if n.message == "WATCHDOG=1"]
        assert len(pings) >= 3, notify_socket.messages()
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(pings)]
        assert all(0.3 < gap < 1.0 for gap in gaps), gaps  # about every WATCHDOG_USEC / 2
        assert {n.pid for n in pings} == {sender}
        process.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", STOP_TIMEOUT_S, process)
        assert process.wait(STOP_TIMEOUT_S) == 0, log.read_text()
    assert notify_socket.messages().count("READY=1") == 1


def test_only_the_main_process_feeds_the_watchdog(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    """A process that is not the one systemd started (WATCHDOG_PID names another) keeps
    quiet: a stuck main process must not be kept alive by a child's pings."""
    env = base_env(
        tmp_path / "state",
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        WATCHDOG_PID=str(os.getpid()),
    )
    with running([str(COLLECTOR), "forward"], env, tmp_path / "forward.log") as process:
        notify_socket.wait_for("READY=1", START_TIMEOUT_S, process)
        notify_socket.receive(1.5)
        assert "WATCHDOG=1" not in notify_socket.messages()


@pytest.mark.parametrize("command", ["serve", "forward"])
def test_a_notify_socket_nobody_listens_on_does_not_stop_the_collector(
    command: str, tmp_path: Path
) -> None:
    """If systemd is gone (its socket left behind), notifying fails: the collector carries
    on, and still stops on SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        gone = NotifySocket(Path(directory) / "notify")
        gone.close()  # the path stays; connecting to it is refused
        port = free_port()
        env = base_env(
            tmp_path / "state",
            NOTIFY_SOCKET=str(gone.path),
            WATCHDOG_USEC=str(WATCHDOG_USEC),
            COLLECTOR_PORT=str(port),
        )
        log = tmp_path / f"{command}.log"
        with running(as_main_process([str(COLLECTOR), command]), env, log) as process:
            if command == "serve":
                wait_until_serving(f"http://127.0.0.1:{port}", process, log.read_text)
            else:
                wait_until(lambda: (tmp_path / "state" / "forwarder.json").exists(), "forwarder")
            time.sleep(1.0)  # a few failed watchdog pings
            stop(process, log)


# -- the units' command lines, with the units' environment -----------------------------------


@dataclass
class Host:
    """Where the units' commands run: one state directory, each unit's credentials, a test
    upstream; the notify socket and watchdog as systemd sets them."""

    root: Path
    units: dict[str, Unit]
    notify_socket: NotifySocket
    upstream: Upstream
    port: int = field(default_factory=free_port)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, name: str, **more: str) -> dict[str, str]:
        """The environment systemd gives unit `name`'s processes (plus `more`)."""
        unit = self.units[name]
        env = base_env(self.state, **unit.environment())
        credentials = unit.credentials()
        if credentials:
            directory = self.root / "credentials" / name
            directory.mkdir(parents=True, exist_ok=True)
            for credential in credentials:
                (directory / credential).write_text(UPSTREAM_KEY + "\n")
            env["CREDENTIALS_DIRECTORY"] = str(directory)
        # Where this test's server and upstream are; both set in collector.env in real life.
        env.update(COLLECTOR_PORT=str(self.port), COLLECTOR_UPSTREAM_URL=self.upstream.url)
        return {**env, **more}

    def check(self, name: str, prefix: list[str] | None = None) -> None:
        """The unit's ExecStartPre= (config check) passes in its environment."""
        argv = [*(prefix or []), *self.units[name].command("ExecStartPre")]
        done = subprocess.run(argv, cwd="/", env=self.env(name), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"settings ok (data dir {self.state})"

    @contextlib.contextmanager
    def start(
        self, name: str, prefix: list[str] | None = None
    ) -> Iterator[subprocess.Popen[bytes]]:
        """The unit's ExecStart= (after `prefix`, a wrapper), running once it says READY=1."""
        unit = self.units[name]
        env = self.env(
            name,
            NOTIFY_SOCKET=str(self.notify_socket.path),
            WATCHDOG_USEC=str(unit.watchdog_usec()),
        )
        argv = as_main_process([*(prefix or []), *unit.command("ExecStart")])
        log = self.root / f"{name}.log"
        with running(argv, env, log) as process:
            collector = self.notify_socket.wait_for("READY=1", START_TIMEOUT_S, process)
            yield process
            stop(process, log, collector)  # the collector, not a wrapper such as strace

    def create_key(self) -> str:
        done = subprocess.run(
            [str(COLLECTOR), "keys", "create", "--scope", "sdk:write"],
            cwd="/",
            env=self.env("collector-server.service"),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def post(self, key: str, *events: dict[str, object]) -> None:
        answer = httpx.post(
            f"{self.url}/v1/events/batch",
            json={"events": list(events)},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text


@pytest.fixture
def host(tmp_path: Path, units: dict[str, Unit], notify_socket: NotifySocket) -> Iterator[Host]:
    with Upstream() as upstream:
        yield Host(tmp_path, units, notify_socket, upstream)


def test_unit_command_lines_run_the_collector_with_the_unit_environment(host: Host) -> None:
    for name in UNIT_NAMES:
        host.check(name)
    key = host.create_key()
    with host.start("collector-server.service"):
        assert httpx.get(f"{host.url}/healthz", timeout=5).status_code == 200
        host.post(key, event(id="trk_1"), event("exposure", id="exp_1"))
        # The data directory is $STATE_DIRECTORY: the queue is there, and holds the events.
        assert {e["id"] for e in stored_events(host.state)} == {"trk_1", "exp_1"}
        with host.start("collector-forwarder.service") as forwarder:
            delivered = host.upstream.wait_for_events(2, timeout=START_TIMEOUT_S)
            wait_until(lambda: not stored_events(host.state), "the queue to be drained")
            assert (host.state / "forwarder.json").exists()
            # ExecReload= (systemctl reload): SIGHUP, and the forwarder re-reads its keys.
            reload = shlex.split(host.units["collector-forwarder.service"].value("ExecReload"))
            reload = [arg.replace("$MAINPID", str(forwarder.pid)) for arg in reload]
            subprocess.run(reload, env=base_env(host.state), check=True, timeout=30)
            log = host.root / "collector-forwarder.service.log"
            wait_until(lambda: "upstream keys reloaded" in log.read_text(), "a reload")
    assert {e["id"] for e in delivered} == {"trk_1", "exp_1"}
    # The key came from $CREDENTIALS_DIRECTORY (LoadCredential=, upstream_key_file).
    assert {request.key for request in host.upstream.requests} == {UPSTREAM_KEY}


def test_the_server_check_does_not_need_the_forwarder_credential(host: Host) -> None:
    """Both units read collector.env and collector.toml, which may name the upstream key
    file; only the forwarder has it, so only the forwarder's check reads it."""
    for name in UNIT_NAMES:
        argv = host.units[name].command("ExecStartPre")
        env = host.env(name, COLLECTOR_UPSTREAM_KEY_FILE="upstream-key")
        env.pop("CREDENTIALS_DIRECTORY", None)  # as if LoadCredential= were missing
        done = subprocess.run(argv, cwd="/", env=env, capture_output=True, text=True)
        if name == "collector-server.service":
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode == 2
            assert "cannot read secret file upstream-key" in done.stderr


# -- what the sandbox forbids ------------------------------------------------------------------


def _syscall_groups() -> dict[str, set[str]]:
    """Every `@group` of `systemd-analyze syscall-filter`, as names (groups expanded)."""
    listing = _systemd_analyze("syscall-filter").stdout
    direct: dict[str, list[str]] = {}
    current: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            current = direct.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())

    def expand(group: str) -> set[str]:
        names: set[str] = set()
        for entry in direct[group]:
            names |= expand(entry) if entry.startswith("@") else {entry}
        return names

    return {group: expand(group) for group in direct}


def allowed_syscalls(unit: Unit) -> set[str]:
    """The system calls `unit`'s SystemCallFilter= lines allow (allow list, then removals)."""
    groups = _syscall_groups()
    allowed: set[str] = set()
    for line in unit.values("SystemCallFilter"):
        deny = line.startswith("~")
        names: set[str] = set()
        for entry in line.removeprefix("~").split():
            names |= groups[entry] if entry.startswith("@") else {entry}
        allowed = allowed - names if deny else allowed | names
    return allowed


@functools.cache
def _can_trace() -> str | None:
    if shutil.which("strace") is None:
        return "strace is not installed"
    done = subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], capture_output=True)
    return None if done.returncode == 0 else f"strace cannot trace here: {done.stderr!r}"


@functools.cache
def _mdwe_refused() -> str | None:
    """Why PR_SET_MDWE cannot be used (a kernel before 6.3), or None."""
    done = subprocess.run([sys.executable, "-c", MDWE_WRAPPER, "true"], capture_output=True)
    return None if done.returncode == 0 else done.stderr.decode().strip()


# PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN), what MemoryDenyWriteExecute= enforces (systemd does
# it with seccomp), kept by children and across execve; then a check that it holds.
MDWE_WRAPPER = """
import ctypes, mmap, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE refused: {os.strerror(ctypes.get_errno())}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    os.execvp(sys.argv[1], sys.argv[1:])
sys.exit("PR_SET_MDWE set, yet a writable executable mapping was made")
"""


def run_both_units(host: Host, prefix: list[str] | None = None) -> None:
    """Both units' commands, as in production: check, serve, take events, forward them."""
    for name in UNIT_NAMES:
        host.check(name, prefix)
    key = host.create_key()
    with (
        host.start("collector-server.service", prefix),
        host.start("collector-forwarder.service", prefix),
    ):
        host.post(key, event(id="trk_1"))
        httpx.get(f"{host.url}/metrics", timeout=10).raise_for_status()
        host.upstream.wait_for_events(1, timeout=START_TIMEOUT_S)


@needs_systemd_analyze
@pytest.mark.skipif(_can_trace() is not None, reason=_can_trace() or "")
def test_processes_use_only_what_the_sandbox_allows(host: Host) -> None:
    """Every system call and socket family the server (and its writer child) and the
    forwarder use, from start to SIGTERM, is allowed by their unit."""
    traces = host.root / "traces"
    traces.mkdir()
    # One trace file per process, ExecStartPre= included.
    run_both_units(host, prefix=["strace", "-f", "-qq", "-ff", "-o", str(traces / "trace")])
    used: set[str] = set()
    families: set[str] = set()
    for trace in traces.iterdir():
        for line in trace.read_text(errors="replace").splitlines():
            call = re.match(r"([a-z0-9_]+)\((.*)", line)
            if call:
                used.add(call[1])
                if call[1] == "socket":
                    families.add(call[2].split(",")[0])
    assert "clone3" in used or "clone" in used  # the writer child was traced too
    for name, unit in host.units.items():
        missing = used - allowed_syscalls(unit)
        if os.geteuid() == 0:
            # SQLite gives the files it creates to the database's owner when run as root
            # (never under User=collector).
            missing -= {"fchown"}
        assert not missing, f"{name}: SystemCallFilter= refuses {sorted(missing)}"
        assert families <= set(unit.value("RestrictAddressFamilies").split()), families


@pytest.mark.skipif(_mdwe_refused() is not None, reason=_mdwe_refused() or "")
def test_processes_run_with_writable_executable_memory_refused(host: Host) -> None:
    """MemoryDenyWriteExecute=yes: the server, its writer child and the forwarder work."""
    run_both_units(host, prefix=[sys.executable, "-c", MDWE_WRAPPER])


# -- example files ---------------------------------------------------------------------------


def test_example_environment_file_sets_real_settings(host: Host) -> None:
    """Every commented COLLECTOR_ line of collector.env.example, uncommented, is accepted."""
    lines = (UNITS_DIR / "collector.env.example").read_text().splitlines()
    assignments = dict(
        line.removeprefix("#").split("=", 1)
        for line in lines
        if re.match(r"#?COLLECTOR_[A-Z_]+=", line)
    )
    assert len(assignments) >= 15
    for name in assignments:
        assert name.removeprefix("COLLECTOR_").lower() in Settings.model_fields, name
    argv = host.units["collector-forwarder.service"].command("ExecStartPre")
    env = host.env("collector-forwarder.service", **assignments)
    done = subprocess.run(argv, cwd="/", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_example_toml_file_is_valid(host: Host) -> None:
    example = UNITS_DIR / "collector.toml.example"
    argv = [*host.units["collector-forwarder.service"].command("ExecStartPre")]
    env = host.env("collector-forwarder.service")
    done = subprocess.run(
        [*argv, "--config", str(example)], cwd="/", env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "data dir /var/lib/collector" in done.stdout
