"""The Debian package `scripts/build-deb` makes of `dist/collector`: inspected, then installed
into scratch roots with the real dpkg.

Inspected (`dpkg-deb --info`, `--contents`, `-f`, and its files extracted): its name, control
fields and file list with modes; the units in it run `/usr/bin/collector` and are otherwise
the units of `systemd/`; its executable is `dist/collector`; its Depends name exactly the
packages whose libraries the executable loads from the host (found by running it and asking
`ldd` about its loader and every library it unpacks), at a libc6 version new enough for all;
two builds are the same bytes.

Installed with `dpkg --root=<tmp> --force-script-chrootless --force-not-root -i`: dpkg
unpacks the package into the scratch root, registers it (and its conffiles) in the root's
own database, and runs the package's real maintainer scripts unchrooted on this host with
`DPKG_ROOT=<tmp>` (every dpkg that knows --force-script-chrootless sets it); the scripts take
every path under `$DPKG_ROOT` and skip systemctl then. So, exercised for real: the postinst's
user creation as `systemd-sysusers --root=<tmp>` (the root's /etc/passwd and group get the
user), its data directory as `systemd-tmpfiles --root=<tmp> --create`, its chown of the
conffiles to the root's collector group, its respect of a `dpkg-statoverride --root`; an
upgrade to a repacked newer version (an edited conffile kept), remove and purge (units
enabled first with `systemctl --root=<tmp> enable`). The root's database holds only libc6
and zlib1g, copied from this host's, so dpkg checks the Depends against Debian's real
versions (no --force-depends). Every dpkg call is checked to leave this host's passwd, group,
shadow, /etc/collector, /var/lib/collector, units, enablement and dpkg database as they
were. The installed units pass `systemd-analyze verify --root=<tmp>` (which looks for their
executables in the root: procps' `kill` is copied in, as the Recommends would install it)
and `systemd-analyze security --offline=true --root=<tmp>` at the scores
tests/test_systemd.py requires; the installed `<tmp>/usr/bin/collector` runs `--help` and
`config check` of the installed collector.toml.

Not exercised, and why:
- starting the units, and every systemctl call for real: no systemd runs here. prerm's and
  postrm's calls are run against a `systemctl` that records its arguments, in a private
  mount namespace whose /run has /run/systemd/system (the scripts' sign that systemd runs):
  prerm stops both units on remove, postrm reloads; they call nothing on an upgrade, with
  DPKG_ROOT set, or without systemd. postinst's daemon-reload is never run: a postinst
  without DPKG_ROOT would create the user on this host.
- the adduser fallback: adduser has no --root. The useradd fallback is run (useradd
  --prefix), by the postinst alone with a PATH that has no systemd-sysusers or tmpfiles.
- postrm purge for the real root (it deletes enablement symlinks in this host's /etc).
- the executable on the root's own libraries: the root holds the package alone, no libc, so
  nothing can run chrooted in it; `<tmp>/usr/bin/collector` runs on this host's.
- apt (`apt install ./…deb`) and a conffile prompt: apt would install on this host, and a
  prompt needs a package that changes a conffile the operator edited.

Skipped like tests/test_binary.py (the same check, imported from it): when `dist/collector` is
missing or older than the sources, an error instead with `BINARY_TESTS=required`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import __version__

from conftest import ROOT
from test_binary import _REASON, BINARY
from test_systemd import (
    MAX_EXPOSURE,
    UNIT_NAMES,
    UNITS_DIR,
    Unit,
    _systemd_analyze,
    needs_systemd_analyze,
)

BUILD_DEB = ROOT / "scripts" / "build-deb"
INSTALLED = "/usr/bin/collector"
CONFFILES = ["/etc/collector/collector.toml", "/etc/collector/collector.env"]
DEPENDED_ON = ("libc6", "zlib1g")  # copied from this host's dpkg database into each root
START_TIMEOUT_S = 30.0

pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="not a Debian host (no dpkg)"),
]


def run(*argv: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`argv` to completion; `env` added to ours."""
    return subprocess.run(
        [str(arg) for arg in argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}: {done.stdout}{done.stderr}"
    return done.stdout


def build(out: Path, binary: Path = BINARY) -> subprocess.CompletedProcess[str]:
    return run(BUILD_DEB, DIST=str(out / "dist"), WORK=str(out / "work"), BINARY=str(binary))


def project_version() -> str:
    return __version__


def control_fields(text: str) -> dict[str, str]:
    """A deb822 paragraph: field -> value (continuation lines joined with newlines)."""
    fields: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith((" ", "\t")):
            fields[name] += "\n" + line[1:]
        else:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done = build(tmp_path_factory.mktemp("deb"))
    path = Path(ok(done).strip().splitlines()[-1])
    assert path.is_file(), done.stderr
    return path


@pytest.fixture(scope="module")
def files(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, extracted (`dpkg-deb -x`)."""
    directory = tmp_path_factory.mktemp("extracted")
    ok(run("dpkg-deb", "-x", deb, directory))
    return directory


# -- what the package is -----------------------------------------------------------------------


def test_package_is_named_for_the_project_version_and_this_architecture(deb: Path) -> None:
    arch = ok(run("dpkg", "--print-architecture")).strip()
    assert deb.name == f"collector_{project_version()}_{arch}.deb"
    fields = control_fields(ok(run("dpkg-deb", "-f", deb)))
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
        "collector",
        project_version(),
        arch,
    )


def test_control_fields_describe_a_debian_package(deb: Path, files: Path) -> None:
    fields = control_fields(ok(run("dpkg-deb", "-f", deb)))
    assert re.fullmatch(r"[^<>]+ <[^@<>\s]+@[^@<>\s]+>", fields["Maintainer"]), fields
    assert (fields["Section"], fields["Priority"]) == ("net", "optional")
    summary, _, long = fields["Description"].partition("\n")
    assert summary and len(summary) < 80 and len(long.splitlines()) >= 3, fields["Description"]
    assert fields["Recommends"] == "procps, sqlite3"  # /bin/kill for ExecReload=; salvage
    assert not {"Pre-Depends", "Suggests", "Conflicts", "Breaks"} & fields.keys()
    # Installed-Size: KiB, each file rounded up, as dpkg-gencontrol counts.
    sizes = [path.stat().st_size for path in files.rglob("*") if path.is_file()]
    assert int(fields["Installed-Size"]) == sum((size + 1023) // 1024 for size in sizes)
    assert not re.search(r"@[A-Z_]+@", ok(run("dpkg-deb", "-f", deb))), "a placeholder left"


@dataclasses.dataclass(frozen=True)
class Entry:
    mode: str  # as tar prints it: -rwxr-xr-x
    owner: str  # root/root
    size: int


def contents(deb: Path) -> dict[str, Entry]:
    """`dpkg-deb --contents`: path -> entry."""
    entries = {}
    for line in ok(run("dpkg-deb", "--contents", deb)).splitlines():
        mode, owner, size, _date, _time, path = line.split(maxsplit=5)
        entries[path.removeprefix(".").rstrip("/") or "/"] = Entry(mode, owner, int(size))
    return entries


def test_files_are_where_debian_puts_them_with_their_modes(deb: Path) -> None:
    files = {path: entry for path, entry in contents(deb).items() if entry.mode[0] != "d"}
    assert {path: entry.mode for path, entry in files.items()} == {
        "/usr/bin/collector": "-rwxr-xr-x",
        "/usr/lib/systemd/system/collector-server.service": "-rw-r--r--",
        "/usr/lib/systemd/system/collector-forwarder.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/collector.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/collector.conf": "-rw-r--r--",
        # Not world-readable from the start; postinst gives them to the group collector.
        "/etc/collector/collector.toml": "-rw-r-----",
        "/etc/collector/collector.env": "-rw-r-----",
    }
    entries = contents(deb)
    assert {entry.owner for entry in entries.values()} == {"root/root"}
    directories = {path: entry.mode for path, entry in entries.items() if entry.mode[0] == "d"}
    assert set(directories.values()) == {"drwxr-xr-x"}
    assert "/usr/local" not in entries and "/var/lib/collector" not in directories


def test_settings_files_are_conffiles_and_the_examples(deb: Path, files: Path) -> None:
    assert ok(run("dpkg-deb", "--info", deb, "conffiles")).splitlines() == CONFFILES
    for path, example in zip(
        CONFFILES, ["collector.toml.example", "collector.env.example"], strict=True
    ):
        assert (files / path.lstrip("/")).read_bytes() == (UNITS_DIR / example).read_bytes()
    sysusers = files / "usr/lib/sysusers.d/collector.conf"
    assert sysusers.read_bytes() == (UNITS_DIR / "collector.sysusers").read_bytes()


def test_maintainer_scripts_are_there_and_md5sums_cover_the_other_files(
    deb: Path, files: Path
) -> None:
    info = ok(run("dpkg-deb", "--info", deb))
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"^ +\d+ bytes, +\d+ lines +\* +{script} +#!/bin/sh$", info, re.M), info
    sums = ok(run("dpkg-deb", "--info", deb, "md5sums")).splitlines()
    listed = {line.split(maxsplit=1)[1]: line.split()[0] for line in sums}
    assert set(listed) == {
        path.relative_to(files).as_posix()
        for path in files.rglob("*")
        if path.is_file() and not path.relative_to(files).as_posix().startswith("etc/")
    }
    for path, digest in listed.items():
        assert hashlib.md5((files / path).read_bytes()).hexdigest() == digest, path


def test_executable_is_dist_collector(files: Path) -> None:
    assert (files / "usr/bin/collector").read_bytes() == BINARY.read_bytes()


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_units_run_usr_bin_collector_and_are_otherwise_the_repositorys(
    name: str, files: Path
) -> None:
    packaged = Unit.read(files / "usr/lib/systemd/system" / name)
    original = Unit.read(UNITS_DIR / name)
    for key in ("ExecStartPre", "ExecStart"):
        (line,) = packaged.values(key)
        (before,) = original.values(key)
        assert line.split()[0] == INSTALLED
        assert line.split()[1:] == before.split()[1:]
    assert "/usr/local" not in (files / "usr/lib/systemd/system" / name).read_text()

    def without_exec(unit: Unit) -> dict[str, list[tuple[str, str]]]:
        return {
            section: [(k, v) for k, v in directives if k not in ("ExecStartPre", "ExecStart")]
            for section, directives in unit.sections.items()
        }

    assert without_exec(packaged) == without_exec(original)


def test_two_builds_of_one_commit_are_the_same_bytes(deb: Path, tmp_path: Path) -> None:
    again = Path(ok(build(tmp_path)).strip().splitlines()[-1])
    assert again.read_bytes() == deb.read_bytes()
    # File times are the last commit's (SOURCE_DATE_EPOCH), not the build's.
    commit_time = int(ok(run("git", "-C", ROOT, "log", "-1", "--format=%ct")))
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        assert {member.mtime for member in archive.getmembers()} == {commit_time}


def test_build_refuses_a_missing_or_stale_executable(tmp_path: Path) -> None:
    missing = build(tmp_path, tmp_path / "no-such-collector")
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr and "scripts/build-binary" in missing.stderr
    stale = tmp_path / "old-collector"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))  # built before every source file
    refused = build(tmp_path, stale)
    assert refused.returncode != 0
    assert "is older than" in refused.stderr and "scripts/build-binary" in refused.stderr
    assert not (tmp_path / "dist").exists()


# -- what the executable needs of the host -----------------------------------------------------


@contextlib.contextmanager
def unpacked(executable: Path, tmp: Path) -> Iterator[Path]:
    """`executable forward` running (with no upstream it waits): the directory its loader
    unpacked the collector into, while it runs."""
    unpack, data, log = tmp / "unpack", tmp / "data", tmp / "forward.log"
    unpack.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(unpack)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [executable, "forward"],
            env={**env, "COLLECTOR_DATA_DIR": str(data)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (data / "forwarder.json").exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the forwarder did not start: {log.read_text()}"
            time.sleep(0.1)
        (bundle,) = unpack.glob("_MEI*")
        yield bundle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclasses.dataclass
class Needs:
    """What ELF objects load from the host, by `ldd -v`."""

    host_files: set[str] = dataclasses.field(default_factory=set)
    not_found: set[str] = dataclasses.field(default_factory=set)
    glibc: set[str] = dataclasses.field(default_factory=set)  # GLIBC_ versions they require

    def add(self, path: Path, bundle: Path | None = None) -> None:
        """`path`'s needs, its libraries looked up in `bundle` first when given (as the
        unpacked collector's are: the loader points LD_LIBRARY_PATH there)."""
        env = {"LD_LIBRARY_PATH": str(bundle)} if bundle else {}
        output = run("ldd", "-v", path, **env).stdout
        section = ""
        for line in output.splitlines():
            if re.fullmatch(r"\t\S.*:", line):  # "\t/path/of/object:" in Version information
                section = line.strip().removesuffix(":")
            elif match := re.fullmatch(r"\t\t\S+ \((GLIBC_[\d.]+)\) => .*", line):
                if section == str(path):  # not the versions the host's libc asks of ld.so
                    self.glibc.add(match[1].removeprefix("GLIBC_"))
            elif match := re.fullmatch(r"\t(\S+) => not found", line):
                self.not_found.add(f"{path.name}: {match[1]}")
            elif (match := re.fullmatch(r"\t(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)", line)) and (
                bundle is None or not Path(match[1]).is_relative_to(bundle)
            ):
                self.host_files.add(match[1])


def package_of(path: str) -> str:
    """The installed package that holds `path` (tried with and without /usr: merged /usr)."""
    for candidate in (path, path.removeprefix("/usr"), "/usr" + path):
        done = run("dpkg", "-S", candidate)
        if done.returncode == 0:
            return done.stdout.split(":")[0]
    raise AssertionError(f"no installed package holds {path}")


def depends(deb: Path) -> dict[str, str]:
    """Depends: package -> its `>=` version (these Depends have one each)."""
    found = {}
    for item in control_fields(ok(run("dpkg-deb", "-f", deb)))["Depends"].split(","):
        match = re.fullmatch(r"([a-z0-9.+-]+) \(>= ([^)]+)\)", item.strip())
        assert match, f"not of the form 'name (>= version)': {item!r}"
        found[match[1]] = match[2]
    return found


def test_depends_are_the_packages_of_what_the_executable_loads_from_the_host(
    deb: Path, files: Path, tmp_path: Path
) -> None:
    executable = files / "usr/bin/collector"
    needs = Needs()
    needs.add(executable)  # the loader: it runs before anything is unpacked
    with unpacked(executable, tmp_path) as bundle:
        objects = [
            path
            for path in bundle.rglob("*.so*")
            if path.is_file() and path.read_bytes()[:4] == b"\x7fELF"
        ]
        assert len(objects) > 30, objects  # libpython, libssl, the extension modules...
        for path in objects:
            needs.add(path, bundle)
    assert not needs.not_found, needs.not_found
    wanted = depends(deb)
    assert {package_of(path) for path in needs.host_files} == set(wanted)
    # libc6: the newest symbol version any of them asks for; no older (it would not run),
    # no newer (it would refuse hosts it runs on).
    assert wanted["libc6"] == max(needs.glibc, key=version_key)
    # zlib1g: what dpkg-shlibdeps would say, from zlib1g's shlibs file.
    shlibs = ok(run("dpkg-query", "--control-show", "zlib1g", "shlibs"))
    assert f"libz 1 zlib1g (>= {wanted['zlib1g']})" in shlibs.splitlines()


# -- installed into a scratch root -------------------------------------------------------------

# What a leak from a scratch root into this host would change.
HOST_PATHS = [
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/collector",
    "/etc/systemd/system",
    "/etc/systemd/system/multi-user.target.wants",
    "/var/lib/collector",
    "/usr/bin/collector",
    "/usr/lib/systemd/system/collector-server.service",
    "/usr/lib/sysusers.d/collector.conf",
    "/usr/lib/tmpfiles.d/collector.conf",
    "/var/lib/dpkg/status",
    "/var/lib/dpkg/statoverride",
]


def host_state() -> dict[str, str | list[str] | None]:
    state: dict[str, str | list[str] | None] = {}
    for name in HOST_PATHS:
        path = Path(name)
        if path.is_dir():
            state[name] = sorted(os.listdir(path))
        elif path.is_file():
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[name] = None
    return state


@dataclasses.dataclass(frozen=True)
class ScratchRoot:
    """A directory dpkg installs into (`--root`), with a database of its own."""

    path: Path

    @classmethod
    def make(cls, path: Path) -> ScratchRoot:
        admin = path / "var/lib/dpkg"
        for directory in ("info", "updates", "triggers"):
            (admin / directory).mkdir(parents=True)
        (admin / "available").touch()
        # The packages the Depends name, as this host has them (their files are not there).
        (admin / "status").write_text(ok(run("dpkg-query", "--status", *DEPENDED_ON)))
        names = ok(run("dpkg-query", "--show", "--showformat=${binary:Package}\n", *DEPENDED_ON))
        for name in names.split():
            (admin / "info" / f"{name}.list").touch()
        return cls(path)

    def dpkg(self, *args: str | Path) -> str:
        """dpkg on this root (its output); this host must be left as it was."""
        before = host_state()
        done = run(
            "dpkg", f"--root={self.path}", "--force-script-chrootless", "--force-not-root", *args
        )
        assert host_state() == before, "dpkg in the scratch root changed this host"
        return ok(done) + done.stderr

    def query(self, showformat: str) -> str:
        admin = self.path / "var/lib/dpkg"
        return ok(run("dpkg-query", f"--admindir={admin}", "-W", f"-f={showformat}", "collector"))

    def entry(self, database: str, name: str = "collector") -> list[str]:
        """`name`'s line of the root's /etc/passwd or /etc/group, split."""
        for line in (self.path / "etc" / database).read_text().splitlines():
            if line.split(":")[0] == name:
                return line.split(":")
        raise AssertionError(f"no {name} in the root's /etc/{database}")

    def ids(self) -> tuple[int, int]:
        """The uid and gid of collector in the root."""
        return int(self.entry("passwd")[2]), int(self.entry("group")[2])

    def analyze(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _systemd_analyze(*args, f"--root={self.path}")

    def verify(self, unit: str) -> subprocess.CompletedProcess[str]:
        """`systemd-analyze verify` of an installed unit, as the tests below run it."""
        path = f"/usr/lib/systemd/system/{unit}"
        return self.analyze("verify", "--man=no", "--recursive-errors=no", path)


def installed_root(path: Path, deb: Path) -> tuple[ScratchRoot, str]:
    root = ScratchRoot.make(path)
    return root, root.dpkg("--install", deb)


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ScratchRoot, str]:
    """The package installed in a root, and what dpkg said; `kill` there too, as procps
    (which the package recommends) would put it, for the forwarder's ExecReload=."""
    root, output = installed_root(tmp_path_factory.mktemp("root"), deb)
    kill = shutil.which("kill")
    assert kill, "no kill on this host"
    shutil.copy(kill, root.path / "usr/bin/kill")
    return root, output


def test_install_configures_the_package_and_enables_nothing(
    installed: tuple[ScratchRoot, str],
) -> None:
    root, output = installed
    # Configured: its Depends were met (by the root's libc6 and zlib1g, no --force-depends).
    assert root.query("${Status} ${Version}") == f"install ok installed {project_version()}"
    assert "Creating user 'collector' (Traffical edge collector)" in output  # systemd-sysusers
    said = [line for line in output.splitlines() if line.startswith("collector:")]
    assert len(said) == 1, output
    assert said[0].startswith("collector: installed, nothing enabled")
    assert said[0].endswith("systemctl enable --now collector-server collector-forwarder")
    assert not (root.path / "etc/systemd").exists()  # no unit enabled
    registered = root.query("${Conffiles}").split()
    assert registered[0::2] == CONFFILES


def test_install_creates_the_system_user_in_the_root(installed: tuple[ScratchRoot, str]) -> None:
    root, _ = installed
    name, _, uid, gid, comment, home, shell = root.entry("passwd")
    assert (name, comment, home, shell) == (
        "collector",
        "Traffical edge collector",
        "/var/lib/collector",
        "/usr/sbin/nologin",
    )
    assert 0 < int(uid) < 1000, uid  # a system user
    assert int(gid) == int(root.entry("group")[2])  # its own group


def test_install_makes_the_data_directory_the_units_would(
    installed: tuple[ScratchRoot, str],
) -> None:
    root, _ = installed
    data = (root.path / "var/lib/collector").stat()
    assert (data.st_mode & 0o7777, data.st_uid, data.st_gid) == (0o700, *root.ids())
    assert not any((root.path / "var/lib/collector").iterdir())


def test_install_makes_the_settings_readable_by_the_collector_group_only(
    installed: tuple[ScratchRoot, str],
) -> None:
    root, _ = installed
    for path in CONFFILES:
        stat = (root.path / path.lstrip("/")).stat()
        assert (stat.st_mode & 0o7777, stat.st_uid, stat.st_gid) == (0o640, 0, root.ids()[1])


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_installed_units_pass_systemd_analyze_verify(
    name: str, installed: tuple[ScratchRoot, str]
) -> None:
    root, _ = installed
    done = root.verify(name)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_looks_for_the_units_commands_in_the_root(deb: Path, tmp_path: Path) -> None:
    """So the check above can fail: without procps' kill (ExecReload=) in the root the
    forwarder is refused; without /usr/bin/collector there, both are."""
    root, _ = installed_root(tmp_path, deb)

    assert root.verify("collector-server.service").stderr == ""
    assert "Command kill is not executable" in root.verify("collector-forwarder.service").stderr
    (root.path / "usr/bin/collector").unlink()
    missing = root.verify("collector-server.service").stderr
    assert f"Command {INSTALLED} is not executable" in missing


def exposure(done: subprocess.CompletedProcess[str]) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match[1])


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_installed_units_are_rated_as_the_repositorys(
    name: str, installed: tuple[ScratchRoot, str]
) -> None:
    root, _ = installed
    rated = exposure(root.analyze("security", "--offline=true", name))
    assert rated <= MAX_EXPOSURE
    assert rated == exposure(_systemd_analyze("security", "--offline=true", str(UNITS_DIR / name)))


def test_installed_executable_runs_with_the_installed_settings(
    installed: tuple[ScratchRoot, str], tmp_path: Path
) -> None:
    root, _ = installed
    executable = root.path / INSTALLED.lstrip("/")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    shown = run(executable, "--help", **env)
    assert shown.returncode == 0 and "Edge collector" in shown.stdout, shown.stderr
    # The settings file as installed is valid (its data_dir overridden: not this host's).
    settings = root.path / "etc/collector/collector.toml"
    data = str(tmp_path / "data")
    checked = run(
        executable,
        "config",
        "check",
        "--no-secrets",
        "--config",
        settings,
        **env,
        COLLECTOR_DATA_DIR=data,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"settings ok (data dir {data})"


def repack(deb: Path, version: str, directory: Path) -> Path:
    """`deb` with another version: the same files and scripts."""
    tree = directory / "tree"
    ok(run("dpkg-deb", "--raw-extract", deb, tree))
    control = tree / "DEBIAN/control"
    control.write_text(
        re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M)
    )
    newer = directory / f"collector_{version}.deb"
    ok(run("dpkg-deb", "--build", "--root-owner-group", "-Znone", tree, newer))
    return newer


def test_an_upgrade_keeps_the_operators_settings_and_data(deb: Path, tmp_path: Path) -> None:
    root, _ = installed_root(tmp_path / "root", deb)
    ids = root.ids()
    toml = root.path / "etc/collector/collector.toml"
    toml.write_text(toml.read_text() + "port = 9999\n")
    edited = toml.read_bytes()
    # An operator's own owner and mode for the environment file, which postinst respects.
    env = "/etc/collector/collector.env"
    ok(
        run(
            "dpkg-statoverride", f"--root={root.path}", "--update", "--add", "#0", "#0", "0600", env
        )
    )
    (root.path / "var/lib/collector/queue.db").write_bytes(b"events")

    output = root.dpkg("--install", repack(deb, f"{project_version()}+1", tmp_path))

    assert root.query("${Status} ${Version}") == f"install ok installed {project_version()}+1"
    assert f"collector: upgraded from {project_version()}, nothing restarted" in output
    assert toml.read_bytes() == edited  # no prompt: the package's version did not change
    stat = toml.stat()
    assert (stat.st_mode & 0o7777, stat.st_uid, stat.st_gid) == (0o640, 0, ids[1])
    stat = (root.path / env.lstrip("/")).stat()
    assert (stat.st_mode & 0o7777, stat.st_uid, stat.st_gid) == (0o600, 0, 0)
    assert root.ids() == ids
    assert (root.path / "var/lib/collector/queue.db").read_bytes() == b"events"


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_remove_keeps_settings_data_and_user_and_purge_still_keeps_the_data(
    deb: Path, tmp_path: Path
) -> None:
    root, _ = installed_root(tmp_path, deb)
    # Enabled, as docs/operating.md says (offline: systemctl --root).
    units = list(UNIT_NAMES)
    ok(run("systemctl", f"--root={root.path}", "enable", *units))
    wants = root.path / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == sorted(units)
    (root.path / "var/lib/collector/queue.db").write_bytes(b"events")
    (root.path / "etc/collector/upstream-key").write_text("traffical_sk_x\n")
    ids = root.ids()

    removed = root.dpkg("--remove", "collector")
    assert "collector: removed; kept /etc/collector, the data directory" in removed
    assert root.query("${Status}") == "deinstall ok config-files"
    for gone in [INSTALLED, *(f"/usr/lib/systemd/system/{name}" for name in UNIT_NAMES)]:
        assert not (root.path / gone.lstrip("/")).exists(), gone
    for kept in [*CONFFILES, "/etc/collector/upstream-key", "/var/lib/collector/queue.db"]:
        assert (root.path / kept.lstrip("/")).exists(), kept
    assert sorted(p.name for p in wants.iterdir()) == sorted(units)  # a reinstall is enabled
    assert root.ids() == ids

    purged = root.dpkg("--purge", "collector")
    assert (
        "kept what is not the package's: /var/lib/collector /etc/collector/upstream-key" in purged
    )
    forgotten = run("dpkg-query", f"--admindir={root.path / 'var/lib/dpkg'}", "-W", "collector")
    assert "no packages found matching collector" in forgotten.stderr
    for gone in CONFFILES:
        assert not (root.path / gone.lstrip("/")).exists(), gone
    assert list(wants.iterdir()) == []
    assert (root.path / "var/lib/collector/queue.db").read_bytes() == b"events"
    assert (root.path / "etc/collector/upstream-key").exists()  # the operator's
    assert root.ids() == ids  # Debian leaves system users


# -- the maintainer scripts on their own ---------------------------------------------------------


@pytest.fixture(scope="module")
def scripts(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's control files (`dpkg-deb --control`)."""
    directory = tmp_path_factory.mktemp("control")
    ok(run("dpkg-deb", "--control", deb, directory))
    return directory


def test_postinst_without_systemd_sysusers_creates_the_user_with_useradd(
    scripts: Path, files: Path, tmp_path: Path
) -> None:
    """The fallback, on a root holding the settings files: a PATH with useradd and the
    commands the postinst needs, but neither systemd-sysusers nor systemd-tmpfiles."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "awk", "cut", "install", "chown", "chmod", "useradd", "dpkg-statoverride"):
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert found, tool
        (tools / tool).symlink_to(found)
    root = tmp_path / "root"
    shutil.copytree(files / "etc", root / "etc")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/statoverride").touch()
    before = host_state()
    done = subprocess.run(
        [scripts / "postinst", "configure", ""],
        env={"PATH": str(tools), "DPKG_ROOT": str(root)},
        capture_output=True,
        text=True,
    )
    assert host_state() == before
    assert done.returncode == 0, done.stderr
    name, _, _, _, comment, home, shell = ScratchRoot(root).entry("passwd")
    assert (name, comment, home, shell) == (
        "collector",
        "Traffical edge collector",
        "/var/lib/collector",
        "/usr/sbin/nologin",
    )
    uid, gid = ScratchRoot(root).ids()
    data = (root / "var/lib/collector").stat()
    assert (data.st_mode & 0o7777, data.st_uid, data.st_gid) == (0o700, uid, gid)
    for path in CONFFILES:
        stat = (root / path.lstrip("/")).stat()
        assert (stat.st_mode & 0o7777, stat.st_gid) == (0o640, gid)


SYSTEMD_RUNS = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"'


@functools.cache
def _can_unshare() -> str | None:
    """Why no private mount namespace with /run/systemd/system can be made here, or None."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", SYSTEMD_RUNS, "sh", "true"], capture_output=True
    )
    return None if done.returncode == 0 else f"no private mount namespace here: {done.stderr!r}"


@pytest.mark.skipif(_can_unshare() is not None, reason=_can_unshare() or "")
@pytest.mark.parametrize(
    ("script", "args", "systemd", "dpkg_root", "calls"),
    [
        pytest.param(
            "prerm",
            ["remove"],
            True,
            False,
            ["stop collector-forwarder.service collector-server.service"],
            id="prerm-remove-stops-both",
        ),
        pytest.param("postrm", ["remove"], True, False, ["daemon-reload"], id="postrm-reloads"),
        pytest.param("prerm", ["upgrade", "0.1.1"], True, False, [], id="prerm-upgrade-stops-none"),
        # dpkg --root: the systemd that runs is this host's, not the root's.
        pytest.param("prerm", ["remove"], True, True, [], id="prerm-dpkg-root"),
        pytest.param("postrm", ["remove"], True, True, [], id="postrm-dpkg-root"),
        pytest.param("prerm", ["remove"], False, False, [], id="prerm-no-systemd"),
        pytest.param("postrm", ["remove"], False, False, [], id="postrm-no-systemd"),
    ],
)
def test_removal_scripts_call_systemctl_only_when_systemd_runs(
    script: str,
    args: list[str],
    systemd: bool,
    dpkg_root: bool,
    calls: list[str],
    scripts: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "systemctl.log"
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >>{log}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin"}
    if dpkg_root:
        env["DPKG_ROOT"] = str(tmp_path / "root")
    argv = [str(scripts / script), *args]
    if systemd:
        argv = ["unshare", "--mount", "sh", "-c", SYSTEMD_RUNS, "sh", *argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (log.read_text().splitlines() if log.exists() else []) == calls
