"""The sidecar kit (`Dockerfile`, `deploy/compose.yaml`, `deploy/kubernetes/`), checked
without a container runtime: no image is built, no container or pod is started.

What is read and asserted:

- the Dockerfile, with a small parser for the instructions it uses: the image runs
  `collector run` in exec form as a numeric non-root user, stops on SIGTERM, keeps its data
  directory in a VOLUME made for that user before the VOLUME line, keeps events on loopback
  and exposes the health port alone, holds no key, and builds the executable on the Debian
  it runs on from a build context (`.dockerignore`) that holds what the build copies;
- the Kubernetes manifests, against the Kubernetes API's own schemas (kubernetes-validate,
  strict, at 1.29, the first release with native sidecars on by default, and at the newest
  it has), and for what they mean: the collector a native sidecar after an init container
  that gives it the app's key, probes on the health listener, a grace period above the
  stop's, the upstream key from a Secret file readable by the image's user, resources that
  hold the measured memory, and the Deployment's pod the StatefulSet's;
- the compose file, against the compose specification's schema (the one check-jsonschema
  ships), and for what it means.

What is run, as the image and the pod would run it: the StatefulSet's pod, container by
container in Kubernetes' order, each with its command from the manifest or the image's
ENTRYPOINT + CMD (`dist/collector`, copied in, standing for `/usr/local/bin/collector`),
the Dockerfile's ENV overlaid with the container's env (Kubernetes' `$(VAR)` expansion
applied), its volumes laid out as the kubelet lays them out (owner, group, mode, fsGroup) in
a scratch directory, its paths remapped into it, and the manifest's ports replaced by free
ones. As root (here and in CI), each container's process runs as the Dockerfile's uid with
the pod's fsGroup, no new privileges and no capabilities, and as PID 1 of a PID namespace of
its own (`unshare`, `setpriv`), the way a container runtime starts it: a PID 1 gets no
signal it has no handler for, so a SIGTERM that is ignored would show. The kubelet's probes,
the app's events (the example app's own script, with curl), the forwarding to a test
upstream with the key from the Secret file, the stop in the pod's order (the app, then the
sidecar), and a restart on the same volume are all real. Not root: the processes run as
this user, not as PID 1, and the test says so in a warning.

What cannot be shown here: that `docker build` succeeds (no runtime and no registry are
reachable: the build stage's `apt-get` and `pip` are not run), that the base images and
the example app's image exist, how a real kubelet or dockerd behaves beyond what these
files say, the network namespace the app and the collector share (everything here shares
the test's), and the kubelet's probes coming from the node (they come from 127.0.0.1).

The static checks need no executable; the run skips, like tests/test_binary.py, when
`dist/collector` is missing or stale, and BINARY_TESTS=required makes that an error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.resources
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jsonschema
import pytest
import yaml

from collector.settings import Settings

from conftest import ROOT, event, free_port, stored_events
from test_binary import _REASON, BINARY
from upstream import Upstream

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
DEPLOYMENT = KUBERNETES / "deployment.yaml"
STATEFULSET = KUBERNETES / "statefulset.yaml"
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
PERFORMANCE = ROOT / "docs" / "performance.md"
INSTALLED = "/usr/local/bin/collector"
SIDECAR = "collector"
APP = "app"
# The oldest Kubernetes whose API has native sidecars on by default.
OLDEST_KUBERNETES = "1.29"
# Room the grace period must leave for the app's own stop before the collector's:
# Kubernetes' default terminationGracePeriodSeconds.
APP_STOP_S = 30
# How long the example app may take to exit on SIGTERM (a curl in flight has 5 s).
APP_SIGTERM_S = 6
# Where a Debian image looks for programs (the base image's PATH).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULTS = Settings.model_fields

needs_binary = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# -- the Dockerfile ------------------------------------------------------------------------

# The instructions the Dockerfile may use: another one fails the parse, not the image.
INSTRUCTIONS = frozenset(
    {"FROM", "RUN", "COPY", "WORKDIR", "ENV", "ARG", "USER", "VOLUME", "EXPOSE", "STOPSIGNAL"}
    | {"ENTRYPOINT", "CMD"}
)


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str  # everything after the name, continuation lines joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        found = self.all(name)
        assert found, f"the stage FROM {self.base} has no {name}"
        return found[-1]

    def env(self) -> dict[str, str]:
        return {k: v for i in self.all("ENV") for k, v in assignments(i).items()}


def parse_dockerfile(text: str) -> list[Stage]:
    """The Dockerfile's stages, as Docker reads them: comment lines dropped (inside a
    continuation too), lines ending in a backslash joined to the next."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        logical = " ".join(pending)
        pending = []
        name, _, args = logical.partition(" ")
        name = name.upper()
        assert name in INSTRUCTIONS, f"Dockerfile:{start}: {name} is not parsed by this test"
        if name == "FROM":
            words = args.split()
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], stage_name))
        else:
            assert stages, f"Dockerfile:{start}: {name} before FROM"
            stages[-1].instructions.append(Instruction(name, args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation"
    return stages


def assignments(instruction: Instruction) -> dict[str, str]:
    """NAME=value pairs of an ENV or ARG (an ARG without a value maps to "")."""
    pairs = {}
    for word in shlex.split(instruction.args):
        name, equals, value = word.partition("=")
        assert equals or instruction.name == "ARG", f"{instruction}: use the NAME=value form"
        pairs[name] = value
    return pairs


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec) form's list; the shell form fails."""
    try:
        value = json.loads(instruction.args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"Dockerfile:{instruction.line}: {instruction.name} is not in exec (JSON) form: a "
        "shell would be PID 1, and a shell passes no SIGTERM on"
    )
    return value


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """A COPY's flags, sources and destination."""
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        flag, _, value = words.pop(0)[2:].partition("=")
        flags[flag] = value
    return flags, words[:-1], words[-1]


def run_commands(stage: Stage) -> list[list[str]]:
    """Every simple command of the stage's RUN lines (split at &&), as words."""
    return [
        shlex.split(part)
        for run in stage.all("RUN")
        for part in run.args.split("&&")
        if part.strip()
    ]


def option(words: list[str], *names: str) -> str | None:
    """The value of the first of `names` among `words` (`-o X` or `--opt=X`)."""
    for index, word in enumerate(words):
        for name in names:
            if word == name and index + 1 < len(words):
                return words[index + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


@dataclass(frozen=True)
class Image:
    """What the final stage makes of the image's configuration."""

    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    @property
    def env(self) -> dict[str, str]:
        return self.runtime.env()

    @property
    def user(self) -> tuple[int, int]:
        uid, _, gid = self.runtime.last("USER").args.partition(":")
        assert uid.isdigit() and gid.isdigit(), f"USER {uid}:{gid} is not numeric uid:gid"
        return int(uid), int(gid)

    @property
    def entrypoint(self) -> list[str]:
        return exec_form(self.runtime.last("ENTRYPOINT"))

    @property
    def cmd(self) -> list[str]:
        return exec_form(self.runtime.last("CMD"))

    def setting(self, name: str) -> Any:
        """A collector setting as the image sets it, or the setting's default."""
        value = self.env.get(f"COLLECTOR_{name.upper()}")
        return DEFAULTS[name].default if value is None else value


@functools.cache
def image() -> Image:
    return Image(parse_dockerfile(DOCKERFILE.read_text()))


def test_the_image_runs_collector_run_as_a_numeric_non_root_user_stopped_by_sigterm() -> None:
    uid, gid = image().user
    assert uid != 0 and gid != 0
    assert image().entrypoint == [INSTALLED]
    assert image().cmd == ["run"]
    assert image().runtime.last("STOPSIGNAL").args == "SIGTERM"
    # The user the image makes is that uid and gid.
    commands = {words[0]: words for words in run_commands(image().runtime)}
    assert option(commands["useradd"], "--uid", "-u") == str(uid)
    assert option(commands["useradd"], "--gid", "-g") == str(gid)
    assert option(commands["groupadd"], "--gid", "-g") == str(gid)
    # The executable is root's (no --chown): the user it runs as cannot replace it.
    (flags,) = [f for f, _, to in map(copy_parts, image().runtime.all("COPY")) if to == INSTALLED]
    assert "chown" not in flags


def test_the_data_directory_is_a_volume_made_for_the_image_user_before_the_volume_line() -> None:
    data_dir = image().env["COLLECTOR_DATA_DIR"]
    volume = image().runtime.last("VOLUME")
    assert data_dir in exec_form(volume)
    uid, gid = image().user
    made = []
    for run in image().runtime.all("RUN"):
        for part in run.args.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["install", "-d"] and data_dir in words:
                made.append((words, run.line))
    assert made, f"no RUN makes {data_dir} (install -d)"
    words, line = made[-1]
    assert option(words, "-o") == str(uid) and option(words, "-g") == str(gid), words
    assert option(words, "-m") == "0700", words
    # Docker discards what a RUN changes in a volume's path after the VOLUME line.
    assert line < volume.line


def test_events_stay_on_loopback_and_the_health_port_alone_is_exposed() -> None:
    assert image().setting("host") == "127.0.0.1"
    health = int(image().setting("health_port"))
    assert health != int(image().setting("port"))
    assert image().setting("health_host") == "0.0.0.0"  # the kubelet probes the pod's IP
    exposed = {
        int(port.split("/")[0]) for i in image().runtime.all("EXPOSE") for port in i.args.split()
    }
    assert exposed == {health}


def test_no_layer_of_the_image_holds_a_key() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"traffical_[sp]k_", text)
    for stage in image().stages:
        for instruction in stage.all("ENV") + stage.all("ARG"):
            for name, value in assignments(instruction).items():
                looks_secret = re.search(r"KEY|SECRET|TOKEN|PASSWORD", name.upper())
                assert not (looks_secret and value and not name.endswith("_FILE")), (
                    f"Dockerfile:{instruction.line}: {name} has a value"
                )
        for instruction in stage.all("COPY"):
            _, sources, _ = copy_parts(instruction)
            assert not [s for s in sources if re.search(r"key|secret", s, re.I)], instruction


def test_the_executable_is_built_in_the_image_on_the_debian_it_runs_on() -> None:
    build, runtime = image().stages
    # The build stage: scripts/build-binary under Python 3.11, on Debian 12 (bookworm).
    assert re.fullmatch(r"python:3\.11-slim-bookworm", build.base), build.base
    assert ["scripts/build-binary"] in run_commands(build)
    workdir = build.last("WORKDIR").args
    # The runtime: the same Debian, so that the glibc is the one it was built against.
    assert re.fullmatch(r"debian:12(-slim)?|debian:bookworm(-slim)?", runtime.base), runtime.base
    copied = [copy_parts(i) for i in runtime.all("COPY")]
    assert ({"from": build.name or ""}, [f"{workdir}/dist/collector"], INSTALLED) in copied
    # HTTPS upstreams: the system's CA bundle is installed, and the one the forwarder uses.
    installs = [w for w in run_commands(runtime) if w[:2] == ["apt-get", "install"]]
    assert any("ca-certificates" in words for words in installs), installs
    assert image().env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    # A corrupt queue or dead-letter file is read back with the sqlite3 tool.
    assert any("sqlite3" in words for words in installs), installs


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last rule matching it or
    one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((negated, re.compile(regex)))
    return rules


def test_the_build_context_holds_what_the_build_copies_and_no_key_or_build_output() -> None:
    rules = dockerignore_rules()
    build = image().stages[0]
    for instruction in build.all("COPY"):
        _, sources, _ = copy_parts(instruction)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile:{instruction.line}: no {source}"
            path = ROOT / source
            files = [path] if path.is_file() else list(path.rglob("*.py"))
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                assert not dockerignored(relative, rules), f"{relative} is not in the context"
    for left_out in (
        ".git/config",
        ".venv/bin/python",
        "build/binary/venv/bin/python",
        "dist/collector",
        "collector-data/queue.db",
        "deploy/secrets/upstream-key",
        "upstream-key",
        "collector/__pycache__/settings.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert dockerignored(left_out, rules), f"{left_out} would be in the build context"


# -- the Kubernetes manifests --------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def workload(path: Path) -> dict[str, Any]:
    (found,) = [d for d in documents(path) if d["kind"] in ("Deployment", "StatefulSet")]
    return found


def pod_spec(path: Path) -> dict[str, Any]:
    spec: dict[str, Any] = workload(path)["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal env values (valueFrom is not used for settings)."""
    return {e["name"]: e["value"] for e in c.get("env", [])}


def effective(c: dict[str, Any], name: str) -> Any:
    """A collector setting in a container: its env, else the image's ENV, else the default."""
    value = env_of(c).get(f"COLLECTOR_{name.upper()}")
    return image().setting(name) if value is None else value


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == port]
    return int(number)


def volume_for(spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The pod volume mounted over `path` in container `c`, and `path` inside it."""
    mounts = sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            volume = volumes.get(mount["name"], {"name": mount["name"], "claim": True})
            return volume, path[len(root) :].lstrip("/")
    raise AssertionError(f"{c['name']}: nothing is mounted over {path}")


def quantity(value: str | int) -> float:
    """A Kubernetes quantity: bytes for memory (Ki, Mi, Gi), cores for cpu (m)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


MANIFESTS = [DEPLOYMENT, STATEFULSET]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "newest"])
def test_every_manifest_is_valid_for_the_kubernetes_api(version: str) -> None:
    import kubernetes_validate  # a dev dependency (pyproject.toml)

    shipped = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(f"{OLDEST_KUBERNETES}.") for v in shipped), (
        f"this kubernetes-validate has no {OLDEST_KUBERNETES} schemas ({shipped[0]} and up)"
    )
    target = kubernetes_validate.latest_version() if version == "newest" else version
    paths = sorted(KUBERNETES.glob("*.yaml"))
    assert {DEPLOYMENT, STATEFULSET, SECRET_EXAMPLE} <= set(paths)
    for path in paths:
        for doc in documents(path):
            try:
                kubernetes_validate.validate(doc, target, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{path.name} {doc['kind']}: {exc.message}") from exc
    # The validator is strict: a misspelt field is refused.
    misspelt = copy.deepcopy(workload(DEPLOYMENT))
    container(misspelt["spec"]["template"]["spec"], SIDECAR)["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, target, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_collector_is_a_native_sidecar_ready_before_the_app_starts(path: Path) -> None:
    spec = pod_spec(path)
    inits = [c["name"] for c in spec["initContainers"]]
    sidecar = container(spec, SIDECAR)
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar  # the app starts once the startup probe passes
    assert [c["name"] for c in spec["containers"]] == [APP]
    # The app's key is accepted by an init container that runs to its end before.
    key_init = spec["initContainers"][0]
    assert "restartPolicy" not in key_init
    assert inits.index(key_init["name"]) < inits.index(SIDECAR)
    # The sidecar runs the image's ENTRYPOINT and CMD: `collector run`.
    assert "command" not in sidecar and "args" not in sidecar
    assert sidecar["image"] == key_init["image"]
    # A Service named "collector" would otherwise set COLLECTOR_PORT=tcp://... in the pod.
    assert spec["enableServiceLinks"] is False


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_probes_ask_the_health_listener_what_the_kubelet_needs(path: Path) -> None:
    sidecar = container(pod_spec(path), SIDECAR)
    health = int(effective(sidecar, "health_port"))
    paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, want in paths.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == want, probe
        assert port_number(sidecar, get["port"]) == health, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe
    assert effective(sidecar, "health_host") == "0.0.0.0"  # the kubelet comes from the node
    assert effective(sidecar, "host") == "127.0.0.1"  # events only from inside the pod


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_grace_period_holds_the_apps_stop_and_then_the_collectors(path: Path) -> None:
    spec = pod_spec(path)
    stop_timeout = float(effective(container(spec, SIDECAR), "stop_timeout_seconds"))
    assert spec["terminationGracePeriodSeconds"] > APP_STOP_S + stop_timeout


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_upstream_key_is_a_secret_file_the_image_user_can_read(path: Path) -> None:
    spec = pod_spec(path)
    sidecar = container(spec, SIDECAR)
    env = env_of(sidecar)
    assert "COLLECTOR_UPSTREAM_KEY" not in env
    assert not [e for e in sidecar.get("env", []) if "valueFrom" in e]
    volume, item = volume_for(spec, sidecar, env["COLLECTOR_UPSTREAM_KEY_FILE"])
    secret = volume["secret"]
    assert item in [i["path"] for i in secret["items"]]
    example = {d["metadata"]["name"]: d for d in documents(SECRET_EXAMPLE)}
    assert {i["key"] for i in secret["items"]} <= set(example[secret["secretName"]]["stringData"])
    # The kubelet writes the file root:fsGroup with defaultMode; the image's user reads it
    # as a member of fsGroup.
    uid, gid = image().user
    security = spec["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert security["runAsNonRoot"] is True
    assert secret["defaultMode"] & 0o040 and not secret["defaultMode"] & 0o007
    assert env["COLLECTOR_UPSTREAM_URL"].startswith("https://")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_data_directory_and_the_unpacking_have_writable_volumes(path: Path) -> None:
    spec = pod_spec(path)
    for c in spec["initContainers"][:2]:
        volume, inside = volume_for(spec, c, str(effective(c, "data_dir")))
        assert inside == "" and volume["name"] == "data"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        volume_for(spec, c, "/tmp")  # the one-file build unpacks there
    data = {v["name"]: v for v in spec["volumes"]}.get("data")
    if path == DEPLOYMENT:
        assert data is not None and "emptyDir" in data  # the queue is lost with the pod
        assert "THE QUEUE IS LOST WITH THE POD" in path.read_text()
    else:
        assert data is None
        (claim,) = workload(path)["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one volume each
        disk_budget = DEFAULTS["disk_budget_bytes"].default
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > disk_budget


def measured_peaks_mib() -> list[int]:
    """The memory peaks docs/performance.md gives for 90-second phases."""
    text = " ".join(PERFORMANCE.read_text().split())
    found = re.search(
        r"the peaks are (\d+) MiB \(server\), (\d+) MiB \(writer\) and (\d+) MiB \(forwarder\)",
        text,
    )
    assert found, "docs/performance.md no longer gives the 90-second peaks this test reads"
    return [int(n) for n in found.groups()]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_resources_hold_the_measured_memory_of_collector_run(path: Path) -> None:
    resources = container(pod_spec(path), SIDECAR)["resources"]
    peaks = sum(measured_peaks_mib()) * 2**20
    request = quantity(resources["requests"]["memory"])
    limit = quantity(resources["limits"]["memory"])
    assert request >= peaks, (request, peaks)
    assert limit >= 1.5 * peaks, (limit, peaks)  # room for hostile bodies, page cache
    assert 0 < quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"])
    for c in pod_spec(path)["initContainers"] + pod_spec(path)["containers"]:
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


def test_the_deployment_and_the_statefulset_run_the_same_pod_but_for_the_data_volume() -> None:
    deployment, statefulset = pod_spec(DEPLOYMENT), pod_spec(STATEFULSET)
    without = [v for v in deployment["volumes"] if v["name"] != "data"]
    assert {**deployment, "volumes": without} == statefulset
    assert workload(STATEFULSET)["spec"]["replicas"] > 1


# -- the compose file ----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_literal(value: str) -> str:
    """A compose string as the container gets it: `$$` is `$`; a lone `$` would be
    interpolated from the host's environment, and is refused here."""
    assert "$" not in value.replace("$$", ""), f"an unescaped $ in compose: {value!r}"
    return value.replace("$$", "$")


def duration_s(text: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", text))


def test_the_compose_file_is_valid_for_the_compose_specification() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    misspelt = compose()
    misspelt["services"][SIDECAR]["stop_grace_periodd"] = "30s"
    assert list(validator.iter_errors(misspelt))


def test_compose_starts_the_collector_first_stops_it_last_and_keeps_its_queue() -> None:
    services = compose()["services"]
    collector, app = services[SIDECAR], services[APP]
    # The app joins the collector's network namespace, and so starts after it, once it is
    # healthy, and is stopped before it.
    assert app["network_mode"] == f"service:{SIDECAR}"
    assert app["depends_on"][SIDECAR]["condition"] == "service_healthy"
    base_url = urlsplit(app["environment"]["TRAFFICAL_BASE_URL"])
    assert (base_url.hostname, base_url.port) == ("127.0.0.1", int(image().setting("port")))
    # The collector: the image built from the Dockerfile, the data directory a named volume.
    assert (
        COMPOSE.parent / collector["build"]["context"] / collector["build"]["dockerfile"]
    ).resolve() == DOCKERFILE
    assert "entrypoint" not in collector and "command" not in collector
    source, target = collector["volumes"][0].split(":")[:2]
    assert target == image().env["COLLECTOR_DATA_DIR"]
    assert source in compose()["volumes"]
    # The upstream key: a compose secret (a file), named by COLLECTOR_UPSTREAM_KEY_FILE.
    env = collector["environment"]
    assert "COLLECTOR_UPSTREAM_KEY" not in env
    (secret,) = collector["secrets"]
    assert env["COLLECTOR_UPSTREAM_KEY_FILE"] == f"/run/secrets/{secret}"
    assert "file" in compose()["secrets"][secret]
    stop_timeout = float(
        env.get("COLLECTOR_STOP_TIMEOUT_SECONDS", image().setting("stop_timeout_seconds"))
    )
    assert duration_s(collector["stop_grace_period"]) > stop_timeout
    # The app's key is accepted first, by the Kubernetes pod's very script.
    assert collector["depends_on"]["app-key"]["condition"] == "service_completed_successfully"
    key_init = services["app-key"]
    pod_init = container(pod_spec(DEPLOYMENT), "app-key")
    assert [compose_literal(w) for w in key_init["entrypoint"] + key_init["command"]] == [
        kubernetes_expand(w, {}) for w in pod_init["command"]
    ]
    assert [compose_literal(w) for w in app["entrypoint"] + app["command"]] == [
        kubernetes_expand(w, {}) for w in container(pod_spec(DEPLOYMENT), APP)["command"]
    ]
    # Every $ is escaped (a lone one would take the host's variables).
    for service in services.values():
        for value in json.dumps(service).split('"'):
            compose_literal(value)


def compose_healthcheck() -> list[str]:
    test = compose()["services"][SIDECAR]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [compose_literal(word) for word in test[1:]]


# -- running the pod -----------------------------------------------------------------------


def kubernetes_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command, args and env values: `$(NAME)` is NAME's value when
    it is defined (else left as it is), `$$` is `$`."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


@functools.cache
def container_like() -> str | None:
    """Why processes cannot run as a container runtime runs them here (None: they can)."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): the processes run as this user, not as PID 1"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"no {tool} here: the processes run as root, not as PID 1"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"no PID namespace here ({probe.stderr.strip()}): the processes are not PID 1"
    return None


@dataclass
class Process:
    """One container's process: PID 1 of its own PID namespace where it can be."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def init_pid(self) -> int:
        """The container's PID 1 as seen from here (the child of `unshare --fork`)."""
        if container_like() is not None:
            return self.popen.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
            with contextlib.suppress(OSError):
                if pids := children.read_text().split():
                    return int(pids[0])
            time.sleep(0.02)  # unshare has not forked yet
        raise AssertionError(f"{self.name}: no PID 1 under unshare")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float) -> int:
        """SIGTERM to PID 1, as a runtime stops a container; its exit status."""
        os.kill(self.init_pid(), signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{self.name} still runs {timeout} s after SIGTERM") from exc

    def kill(self) -> None:
        """SIGKILL to its process group (its PID namespace goes with its PID 1)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


class Pod:
    """A pod of a manifest, laid out under `root` as the kubelet would lay it out: one
    directory per volume (claims kept across `start`s, as a StatefulSet's are), the image's
    executable at its place, every container's paths remapped into them."""

    def __init__(
        self,
        root: Path,
        manifest: Path,
        secret_data: dict[str, str],
        ports: dict[int, int],
        overrides: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.root = root
        self.spec = pod_spec(manifest)
        self.claims = {
            c["metadata"]["name"]
            for c in workload(manifest)["spec"].get("volumeClaimTemplates", [])
        }
        self.secret_data = secret_data
        self.ports = ports  # the manifest's port -> the free one used here
        self.overrides = overrides or {}  # container -> env set last (the test upstream)
        security = self.spec["securityContext"]
        self.uid, self.gid = security["runAsUser"], security["runAsGroup"]
        self.fs_group = security["fsGroup"]
        self.processes: list[Process] = []
        self.starts = 0
        executable = root / "image" / INSTALLED.lstrip("/")
        executable.parent.mkdir(parents=True)
        shutil.copy2(BINARY, executable)
        os.chmod(executable, 0o755)
        self.executable = executable
        for name in self.claims:  # a new PersistentVolume, fsGroup applied: root:fsGroup 2775
            self._directory(root / "claims" / name, 0o2775)

    def _directory(self, path: Path, mode: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if container_like() is None:
            os.chown(path, 0, self.fs_group)
            os.chmod(path, mode)
        return path

    def lay_out_volumes(self) -> None:
        """This start's volumes: emptyDirs new, secrets written, claims kept."""
        run = self.root / f"start-{self.starts}"
        self.volumes: dict[str, Path] = {n: self.root / "claims" / n for n in self.claims}
        for volume in self.spec["volumes"]:
            path = run / volume["name"]
            if "emptyDir" in volume:
                self.volumes[volume["name"]] = self._directory(path, 0o2777)
            elif "secret" in volume:
                self._directory(path, 0o755)
                secret = volume["secret"]
                for item in secret.get("items", []):
                    file = path / item["path"]
                    file.write_text(self.secret_data[item["key"]])
                    if container_like() is None:
                        os.chown(file, 0, self.fs_group)
                    os.chmod(file, item.get("mode", secret.get("defaultMode", 0o644)))
                self.volumes[volume["name"]] = path
            else:
                raise AssertionError(f"volume {volume['name']}: a kind this test cannot lay out")

    def host_path(self, c: dict[str, Any], path: str) -> str:
        """Where `path` of container `c` is here: under the volume mounted over it, or, for
        the image's executable, its copy; any other path is the host's own."""
        if path == INSTALLED:
            return str(self.executable)
        for mount in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
            root = mount["mountPath"].rstrip("/")
            if path == root or path.startswith(root + "/"):
                return str(self.volumes[mount["name"]]) + path[len(root) :]
        return path

    def env(self, c: dict[str, Any]) -> dict[str, str]:
        """The image's ENV, then the container's (expanded as Kubernetes does), remapped."""
        env = {"PATH": IMAGE_PATH, "HOME": "/nonexistent"}
        ours = c["image"] == container(self.spec, SIDECAR)["image"]  # the Dockerfile's image
        if ours:
            env.update(image().env)
        for entry in c.get("env", []):
            env[entry["name"]] = kubernetes_expand(entry["value"], env)
        env = {name: self.host_path(c, value) for name, value in env.items()}
        if ours:  # its /usr/local/bin holds the executable
            env["PATH"] = f"{self.executable.parent}:{env['PATH']}"
        env["TMPDIR"] = self.host_path(c, "/tmp")  # the image's /tmp, an emptyDir here
        if c["name"] == SIDECAR:  # the manifest's ports, on free ones here
            env["COLLECTOR_PORT"] = str(self.ports[int(effective(c, "port"))])
            env["COLLECTOR_HEALTH_PORT"] = str(self.ports[int(effective(c, "health_port"))])
        for name, value in env.items():
            parts = urlsplit(value)
            if parts.scheme == "http" and parts.port in self.ports:
                netloc = f"{parts.hostname}:{self.ports[parts.port]}"
                env[name] = urlunsplit(parts._replace(netloc=netloc))
        return {**env, **self.overrides.get(c["name"], {})}

    def argv(self, c: dict[str, Any], env: dict[str, str]) -> list[str]:
        """Kubernetes' rule: `command` replaces ENTRYPOINT (and drops CMD), `args` CMD."""
        command = c.get("command", image().entrypoint)
        args = c.get("args", [] if "command" in c else image().cmd)
        words = [kubernetes_expand(w, env) for w in [*command, *args]]
        return [self.host_path(c, words[0]), *words[1:]]

    def start(self, name: str, logs: Path) -> Process:
        c = container(self.spec, name)
        env = self.env(c)
        argv = self.argv(c, env)
        if container_like() is None:
            wrapper = ["unshare", "--pid", "--fork", "--mount-proc", "setpriv"]
            wrapper += [f"--reuid={self.uid}", f"--regid={self.gid}", f"--groups={self.fs_group}"]
            argv = [*wrapper, "--no-new-privs", "--inh-caps=-all", "--", *argv]
        log = logs / f"{name}-{self.starts}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd="/",
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def run_init(self, name: str, logs: Path, timeout: float = 60) -> Process:
        """A regular init container, to its end (which must be exit 0)."""
        process = self.start(name, logs)
        try:
            code = process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"init container {name} did not finish") from exc
        assert code == 0, f"init container {name} exited {code}: {process.output()}"
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def http_get(port: int, path: str) -> int | None:
    """What an HTTP GET of `path` on 127.0.0.1:`port` answers; None when refused."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=3).status_code
    except httpx.TransportError:
        return None


def wait(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return result


def listening(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """A scratch directory the image's user can reach (pytest's tmp_path is 0700 root's)."""
    root = Path(tempfile.mkdtemp(prefix="collector-pod-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


def fake_key(kind: str) -> str:
    return f"traffical_sk_{kind}_{secrets.token_urlsafe(24)}"


def post(url: str, key: str, events: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/events/batch",
        json={"events": events},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def startup_probe(pod: Pod, process: Process, timeout_s: float) -> None:
    """The kubelet's startup probe: the sidecar is started once it passes."""
    sidecar = container(pod.spec, SIDECAR)
    probe = sidecar["startupProbe"]
    port = pod.ports[port_number(sidecar, probe["httpGet"]["port"])]
    deadline = time.monotonic() + min(timeout_s, probe["periodSeconds"] * probe["failureThreshold"])
    while http_get(port, probe["httpGet"]["path"]) != 200:
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the startup probe failed:\n{process.output()}")
        time.sleep(0.05)


def run_healthcheck(env: dict[str, str]) -> int:
    """compose's healthcheck of the collector, run with the container's environment."""
    return subprocess.run(
        compose_healthcheck(), env=env, capture_output=True, timeout=10
    ).returncode


@needs_binary
def test_the_pod_takes_forwards_stops_and_restarts_without_losing_an_event(
    pod_root: Path, tmp_path: Path, upstream: Upstream
) -> None:
    """The StatefulSet's pod, run as written: the init container accepts the app's key,
    the sidecar passes its startup probe, the example app's events and ours are forwarded
    with the key from the Secret, the stop in the pod's order exits 0 within the grace
    period with what the upstream refused still queued, and a restart on the same volume
    forwards it."""
    if why := container_like():
        warnings.warn(f"the pod's processes: {why}", stacklevel=1)
    app_key, upstream_key = fake_key("app"), fake_key("upstream")
    upstream.accept_keys([upstream_key])
    sidecar = container(pod_spec(STATEFULSET), SIDECAR)
    port, health = int(effective(sidecar, "port")), int(effective(sidecar, "health_port"))
    ports = {port: free_port(), health: free_port()}
    secret_data = {"upstream-key": upstream_key + "\n", "app-key": app_key + "\n"}
    here = {SIDECAR: {"COLLECTOR_UPSTREAM_URL": upstream.url}}  # the manifest's upstream
    pod = Pod(pod_root, STATEFULSET, secret_data, ports, here)
    grace = pod.spec["terminationGracePeriodSeconds"]
    compose_env = compose()["services"][SIDECAR]["environment"]
    healthcheck_env = {"PATH": IMAGE_PATH, **image().env, **compose_env}
    assert int(healthcheck_env["COLLECTOR_HEALTH_PORT"]) == health
    healthcheck_env["COLLECTOR_HEALTH_PORT"] = str(ports[health])
    key_init, *_ = (c["name"] for c in pod.spec["initContainers"])
    forwarded = [event(id=f"forwarded-{n}") for n in range(10)]
    queued = [event(id=f"queued-{n}") for n in range(5)]
    try:
        # The first start: the init container, then the sidecar, then the app.
        pod.lay_out_volumes()
        url = pod.env(container(pod.spec, APP))["TRAFFICAL_BASE_URL"]
        assert url == f"http://127.0.0.1:{ports[port]}"  # the app's base URL: the collector
        assert "Imported key" in pod.run_init(key_init, tmp_path).output()
        collector = pod.start(SIDECAR, tmp_path)
        startup_probe(pod, collector, timeout_s=30)
        app = pod.start(APP, tmp_path) if shutil.which("curl") else None
        if container_like() is None:  # as a runtime starts it: PID 1, the image's user
            status = proc_status(collector.init_pid())
            assert status["NSpid"].split()[-1] == "1", status["NSpid"]
            assert status["Uid"].split() == [str(pod.uid)] * 4
            assert status["Gid"].split() == [str(pod.gid)] * 4
            assert status["Groups"].split() == [str(pod.fs_group)]
            assert (status["NoNewPrivs"], int(status["CapEff"], 16)) == ("1", 0)
        # The kubelet's probes; who can reach which listener.
        assert http_get(ports[health], "/healthz") == 200
        assert http_get(ports[health], "/readyz") == 200
        assert listening(ports[port]) == {"127.0.0.1"}
        assert listening(ports[health]) == {"0.0.0.0"}
        assert run_healthcheck(healthcheck_env) == 0
        # The app's events and ours, forwarded with the upstream key from the Secret file.
        if app is None:
            warnings.warn("no curl here: the example app was not run", stacklevel=1)
        else:
            upstream.wait_until(
                lambda up: any(e.get("event") == "example_heartbeat" for e in up.events),
                timeout=20,
                what="the example app's event",
            )
        answer = post(url, app_key, forwarded)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"accepted": 10, "written": 10, "pipelineWritten": 10}
        ids = {e["id"] for e in forwarded}
        upstream.wait_until(
            lambda up: ids <= set(up.event_ids()), timeout=20, what="our events upstream"
        )
        assert {r.key for r in upstream.accepted()} == {upstream_key}
        # The upstream fails: what comes now stays queued.
        upstream.fail(503)
        assert post(url, app_key, queued).status_code == 200
        queued_ids = {e["id"] for e in queued}
        upstream.wait_until(
            lambda up: any(queued_ids & {e.get("id") for e in r.events} for r in up.requests),
            timeout=20,
            what="the forwarder trying the queued events",
        )

        # The pod's stop: the app first, then the sidecar, within the grace period.
        asked = time.monotonic()
        if app is not None:  # at once, leaving the grace period to the collector
            assert app.stop(timeout=APP_SIGTERM_S) == 0, app.output()
        collector_asked = time.monotonic()
        os.kill(collector.init_pid(), signal.SIGTERM)
        wait("/readyz to fail", lambda: http_get(ports[health], "/readyz") != 200, timeout=2)
        assert run_healthcheck(healthcheck_env) != 0
        remaining = grace - (time.monotonic() - asked)
        try:
            code = collector.popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the collector ran past the grace period ({grace} s)") from exc
        stopped_in = time.monotonic() - collector_asked
        assert code == 0, collector.output()
        assert stopped_in < float(effective(sidecar, "stop_timeout_seconds")), stopped_in
        log = collector.output()
        assert "No API key existed" not in log  # no key made, so none printed in the log
        assert "Traceback" not in log, log
        still = [e["id"] for e in stored_events(pod.volumes["data"])]
        assert sorted(still) == sorted(queued_ids), still
        assert not queued_ids & set(upstream.event_ids())

        # The pod again, on the same claim: the init container finds the key, the sidecar
        # forwards what was left.
        pod.starts += 1
        pod.lay_out_volumes()
        assert "already in the store" in pod.run_init(key_init, tmp_path).output()
        upstream.ok()
        collector = pod.start(SIDECAR, tmp_path)
        startup_probe(pod, collector, timeout_s=30)
        upstream.wait_until(
            lambda up: queued_ids <= set(up.event_ids()), timeout=20, what="the queued events"
        )
        wait("an empty queue", lambda: stored_events(pod.volumes["data"]) == [], timeout=10)
        assert collector.stop(timeout=grace) == 0, collector.output()
        assert {r.key for r in upstream.accepted()} == {upstream_key}
        assert ids | queued_ids <= set(upstream.event_ids())
    finally:
        pod.kill_all()


@needs_binary
def test_the_example_secret_stops_the_pod_at_its_init_container(
    pod_root: Path, tmp_path: Path
) -> None:
    """The placeholders of secret.example.yaml are not keys: the app-key init container
    fails, saying why, and so the pod never starts with them."""
    (example,) = documents(SECRET_EXAMPLE)
    pod = Pod(pod_root, DEPLOYMENT, example["stringData"], {})
    pod.lay_out_volumes()
    key_init = pod.spec["initContainers"][0]["name"]
    try:
        process = pod.start(key_init, tmp_path)
        assert process.popen.wait(timeout=60) != 0
        assert "must look like traffical_sk_" in process.output()
    finally:
        pod.kill_all()
