"""`collector keys`: the CLI run as a subprocess against a real `keys.json` in a tmp dir."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from conftest import COLLECTOR, ROOT, Server, create_key, event, free_port, run_cli

SECRET_KEY = re.compile(r"traffical_sk_[A-Za-z0-9_-]{40,}")
PUBLISHABLE_KEY = re.compile(r"traffical_pk_[A-Za-z0-9_-]{40,}")


def stored_keys(data_dir: Path) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads((data_dir / "keys.json").read_text())["keys"]
    return keys


def listing(data_dir: Path) -> str:
    done = run_cli("keys", "list", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout


def listed_status(data_dir: Path, name: str) -> str:
    """The status column of the `keys list` row of key `name`."""
    [row] = [line for line in listing(data_dir).splitlines() if f" {name} " in line]
    return row.strip("│ ").split("│")[-1].strip()


def test_create_prints_the_secret_key_alone_on_the_last_line(tmp_path: Path) -> None:
    done = run_cli("keys", "create", "--scope", "sdk:write", data_dir=tmp_path)

    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert SECRET_KEY.fullmatch(last), done.stdout
    assert done.stdout.count(last) == 1


def test_create_publishable_gives_a_pk_key(tmp_path: Path) -> None:
    done = run_cli("keys", "create", "--scope", "sdk:write", "--publishable", data_dir=tmp_path)

    assert done.returncode == 0, done.stderr
    assert PUBLISHABLE_KEY.fullmatch(done.stdout.splitlines()[-1]), done.stdout


def test_project_env_expiry_and_name_are_stored_and_listed(tmp_path: Path) -> None:
    create_key(
        tmp_path,
        "--scope",
        "sdk:write",
        "--scope",
        "sdk:read",
        "--project",
        "proj_web",
        "--env",
        "staging",
        "--expires",
        "2030-01-02T03:04:05Z",
        "--name",
        "web-staging",
    )

    [key] = stored_keys(tmp_path)
    assert key["name"] == "web-staging"
    assert key["project"] == "proj_web"
    assert key["env"] == "staging"
    assert key["expires"] == "2030-01-02T03:04:05+00:00"
    assert key["scopes"] == ["sdk:read", "sdk:write"]
    shown = listing(tmp_path)
    for value in ("web-staging", "proj_web", "staging", "2030-01-02T03:04:05+00:00"):
        assert value in shown
    assert listed_status(tmp_path, "web-staging") == "active"


def test_an_expiry_without_offset_is_taken_as_utc(tmp_path: Path) -> None:
    create_key(tmp_path, "--scope", "sdk:write", "--expires", "2030-01-02T03:04:05")

    [key] = stored_keys(tmp_path)
    assert key["expires"] == "2030-01-02T03:04:05+00:00"


def test_secrets_are_never_listed_nor_stored_and_the_file_is_private(tmp_path: Path) -> None:
    secrets = [
        create_key(tmp_path, "--scope", "sdk:write", "--name", "server"),
        create_key(tmp_path, "--scope", "sdk:write", "--publishable", "--name", "browser"),
    ]

    shown = listing(tmp_path)
    stored = (tmp_path / "keys.json").read_text()
    assert "server" in shown and "browser" in shown
    for secret in secrets:
        assert secret not in shown
        assert secret not in stored
        assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600


def test_revoke_by_name_or_prefix_takes_effect_without_a_restart(
    server: Server,
) -> None:
    by_name = create_key(server.data_dir, "--scope", "sdk:write", "--name", "to-revoke")
    by_prefix = create_key(server.data_dir, "--scope", "sdk:write", "--name", "other")
    body = {"events": [event()]}
    assert server.post(body, key=by_name).status_code == 200
    assert server.post(body, key=by_prefix).status_code == 200

    named = run_cli("keys", "revoke", "to-revoke", data_dir=server.data_dir)
    prefixed = run_cli("keys", "revoke", by_prefix[:17], data_dir=server.data_dir)

    assert named.returncode == 0, named.stderr
    assert prefixed.returncode == 0, prefixed.stderr
    assert "other" in prefixed.stdout
    assert listed_status(server.data_dir, "to-revoke") == "revoked"
    assert listed_status(server.data_dir, "other") == "revoked"
    assert server.post(body, key=by_name).status_code == 401
    assert server.post(body, key=by_prefix).status_code == 401
    assert server.post(body).status_code == 200  # the server's own key is untouched


def test_revoking_an_unknown_or_ambiguous_prefix_fails_and_revokes_nothing(
    tmp_path: Path,
) -> None:
    create_key(tmp_path, "--scope", "sdk:write", "--name", "one")
    create_key(tmp_path, "--scope", "sdk:write", "--name", "two")

    unknown = run_cli("keys", "revoke", "traffical_sk_nope!", data_dir=tmp_path)
    ambiguous = run_cli("keys", "revoke", "traffical_sk_", data_dir=tmp_path)

    assert unknown.returncode != 0
    assert "no key" in unknown.stderr
    assert ambiguous.returncode != 0
    assert "matches 2 keys" in ambiguous.stderr
    assert [key["revoked"] for key in stored_keys(tmp_path)] == [None, None]


def test_an_unknown_scope_is_refused(tmp_path: Path) -> None:
    done = run_cli("keys", "create", "--scope", "sdk:admin", data_dir=tmp_path)

    assert done.returncode != 0
    assert "sdk:admin" in done.stderr
    assert "traffical_" not in done.stdout
    assert not (tmp_path / "keys.json").exists() or stored_keys(tmp_path) == []


def test_a_duplicate_name_is_refused(tmp_path: Path) -> None:
    create_key(tmp_path, "--scope", "sdk:write", "--name", "web")

    done = run_cli("keys", "create", "--scope", "sdk:read", "--name", "web", data_dir=tmp_path)

    assert done.returncode != 0
    assert "already exists" in done.stderr
    assert "traffical_" not in done.stdout
    assert [key["scopes"] for key in stored_keys(tmp_path)] == [["sdk:write"]]


def serve(data_dir: Path, stdout: Path) -> Server:
    """`collector serve` on `data_dir`, its stdout alone in `stdout` (stderr in the log)."""
    server = Server(data_dir, free_port(), {})
    env = {**os.environ, "COLLECTOR_DATA_DIR": str(data_dir), "COLLECTOR_PORT": str(server.port)}
    with open(stdout, "wb") as out, open(server.log_path, "ab") as log:
        server.process = subprocess.Popen(
            [*COLLECTOR, "serve"], cwd=ROOT, env=env, stdout=out, stderr=log
        )
    try:
        server.wait_until_up()
    except BaseException:
        server.stop()
        raise
    return server


def test_first_start_creates_a_key_and_prints_it_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    first_out, second_out = tmp_path / "first.out", tmp_path / "second.out"

    server = serve(data_dir, first_out)
    try:
        secret = first_out.read_text().splitlines()[-1]
        assert SECRET_KEY.fullmatch(secret), first_out.read_text()
        answer = server.post({"events": [event(id="trk_first")]}, key=secret)
        assert answer.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
        assert secret not in server.log()  # not in the log (journald keeps logs)
    finally:
        server.stop()

    again = serve(data_dir, second_out)
    try:
        assert "traffical_" not in second_out.read_text()
        assert again.post({"events": [event()]}, key=secret).status_code == 200
    finally:
        again.stop()
    assert [key["name"] for key in stored_keys(data_dir)] == ["default"]


def test_an_existing_key_can_be_imported_from_stdin_and_is_stored_hashed(tmp_path: Path) -> None:
    secret = "traffical_sk_" + "k" * 32
    done = subprocess.run(
        [*COLLECTOR, "keys", "import", "--scope", "sdk:write", "--name", "cloud"],
        cwd=ROOT,
        env={**os.environ, "COLLECTOR_DATA_DIR": str(tmp_path)},
        input=secret + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout
    stored = (tmp_path / "keys.json").read_text()
    assert secret not in stored and hashlib.sha256(secret.encode()).hexdigest() in stored
    again = subprocess.run(
        [*COLLECTOR, "keys", "import", "--scope", "sdk:write"],
        cwd=ROOT,
        env={**os.environ, "COLLECTOR_DATA_DIR": str(tmp_path)},
        input="not-a-key\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "traffical_sk_" in again.stderr
