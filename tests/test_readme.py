"""The README's opening commands stay true, and every CLI command is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import typer.main

from cli import app

from conftest import ROOT, event, stored_events, wait_until_serving

README = (ROOT / "README.md").read_text()
DEFAULT_URL = "http://127.0.0.1:8787"


def code_blocks() -> list[str]:
    return re.findall(r"^```\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_opens_with_install_and_run_then_the_test_command() -> None:
    run, tests = code_blocks()[:2]
    assert run.strip().endswith("&& .venv/bin/collector serve")
    assert ".venv/bin/pip install ." in run
    assert tests.strip().endswith("&& .venv/bin/python -m pytest")
    assert "'.[dev]'" in tests
    # CI runs exactly the README's second block.
    assert "n==3{print; exit}" in (ROOT / ".ci" / "run").read_text()


def test_collector_serve_runs_on_embedded_defaults(tmp_path: Path) -> None:
    """`collector serve` with no settings: ./collector-data, 127.0.0.1:8787, a first key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
    env.pop("STATE_DIRECTORY", None)
    script = Path(sys.executable).parent / "collector"
    process = subprocess.Popen(
        [str(script), "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
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
        assert [e["id"] for e in stored_events(tmp_path / "collector-data")] == ["readme-1"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_every_cli_command_is_documented() -> None:
    group = typer.main.get_group(app)
    names = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands:
            names += [f"collector {name} {sub}" for sub in subcommands]
        else:
            names.append(f"collector {name}")
    missing = [name for name in names if name not in README]
    assert not missing, f"undocumented commands: {missing}"
