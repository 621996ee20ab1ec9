"""The README's opening commands stay true (every CLI command is documented: see
tests/unit/test_docs.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from collector.store import heartbeats

from conftest import ROOT, event, stored_events, wait_until_serving

README = (ROOT / "README.md").read_text()
DEFAULT_URL = "http://127.0.0.1:8787"


def code_blocks() -> list[str]:
    return re.findall(r"^```\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_opens_with_install_and_run_then_the_test_command() -> None:
    run, tests = code_blocks()[:2]
    assert run.strip().startswith("python3.11 -m venv .venv && ")
    assert ".venv/bin/pip install ." in run
    assert run.strip().endswith("&& .venv/bin/collector run")
    assert tests.strip() == "scripts/test"
    # CI runs the same command, which installs the dev extras into a fresh .venv.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "rm -rf .venv" in ci
    assert "\nscripts/test\n" in ci
    script = (ROOT / "scripts" / "test").read_text()
    assert "-m venv .venv" in script
    assert "pip install --quiet --disable-pip-version-check -e '.[dev]'" in script


def test_collector_run_works_on_embedded_defaults(tmp_path: Path) -> None:
    """`collector run` with no settings: ./collector-data, 127.0.0.1:8787, a first key, and
    a forwarder that keeps events queued because no upstream is configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
    env.pop("STATE_DIRECTORY", None)
    script = Path(sys.executable).parent / "collector"
    process = subprocess.Popen(
        [str(script), "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        key = ""
        for line in process.stdout:
            if line.startswith("traffical_sk_"):
                key = line.strip()
                break
        assert key, "no key printed on first start"
        wait_until_serving(DEFAULT_URL, process)
        answer = httpx.post(
            f"{DEFAULT_URL}/v1/events/batch",
            json={"events": [event(id="readme-1")]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 200, answer.text
        data_dir = tmp_path / "collector-data"
        assert [e["id"] for e in stored_events(data_dir)] == ["readme-1"]
        forwarder = wait_for_state(data_dir / "forwarder.json")
        assert forwarder["upstream"] == "not_configured"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def wait_for_state(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = heartbeats.read(path)
        if state is not None:
            return state
        time.sleep(0.05)  # the forwarder writes its state when it starts
    raise AssertionError(f"{path} never written")
