"""The docs keep up with the code: docs/reference.md names every setting, metric family, CLI
command, top-level status field and data file the code has; every relative link in
README.md and docs/*.md points at a file (and a heading) that exists; and every test the
docs cite as proof exists where they say.

Each check reads its list from the code, not from a copy here, so adding a setting, a
metric, a command, a status field or a data file without a line in docs/reference.md fails
this module. How that was checked, when it was written: a throwaway script ran these test
functions against an edited copy of docs/reference.md (`REFERENCE` pointed at it). With the
`log_level` row deleted, the settings test failed naming `log_level`; with the
`collector_up` row deleted, the metrics test failed naming `collector_up` (rows are matched
whole, so `collector_upstream_state` does not stand in for it), and so for
`collector_requests_total` and the `<name>_created` note; with the `### collector dlq
purge` heading, the `recovered` row or the `keys.lock` row deleted, the command, status and
data file tests failed naming each. With `Settings` replaced by a subclass adding a field
`zone`, the settings test failed naming `zone`. A page linking to `nowhere.md` and to
`operating.md#no-such-heading` failed the link test, naming both; a cited test renamed to
one that does not exist failed the last test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from prometheus_client.parser import text_string_to_metric_families

from cli import app
from collector.ops import status
from collector.ops.metrics import Metrics
from collector.settings import Settings
from collector.store import datadir

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The data files the brief of docs/reference.md names; `datadir` may only add to them.
DATA_FILE_CONSTANTS = (
    "QUEUE",
    "SEEN_IDS",
    "COUNTS",
    "DEAD_LETTERS",
    "CONFIG_CACHE",
    "KEYS",
    "KEYS_LOCK",
    "SERVER_STATE",
    "FORWARDER_STATE",
    "FORWARDER_LOCK",
    "FIRST_KEY",
)


def section(title: str) -> str:
    """The text of the `## title` section of docs/reference.md, up to the next `## `."""
    text = REFERENCE.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"docs/reference.md has no '## {title}' section"
    return match.group(1)


def has_row(text: str, *cells: str) -> bool:
    """True when a table row of `text` starts with these cells, each in backticks."""
    start = "".join(rf"\|\s*`{re.escape(cell)}`\s*" for cell in cells)
    return re.search(rf"^{start}\|", text, flags=re.M) is not None


def test_every_setting_is_documented() -> None:
    settings = section("Settings")
    missing = [
        name
        for name in Settings.model_fields
        if not has_row(settings, name, f"COLLECTOR_{name.upper()}")
    ]
    assert not missing, f"settings without a row in docs/reference.md: {missing}"


def test_every_metric_family_is_documented(tmp_path: Path) -> None:
    text = Metrics(Settings(data_dir=tmp_path)).render().decode()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert len(families) > 20, families  # the parser saw the whole page
    metrics = section("Metrics")
    missing = []
    for name, kind in families.items():
        base = name.removesuffix("_created")
        if name != base and families.get(base) in ("histogram", "counter"):
            # prometheus_client's creation time of `base`: documented once, for all.
            if "`<name>_created`" not in metrics:
                missing.append(name)
            continue
        exported = f"{name}_total" if kind == "counter" else name
        if not has_row(metrics, exported):
            missing.append(exported)
    assert not missing, f"metrics without a row in docs/reference.md: {missing}"


def cli_commands() -> list[str]:
    group = typer.main.get_group(app)
    names = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands:
            names += [f"collector {name} {sub}" for sub in subcommands]
        else:
            names.append(f"collector {name}")
    return names


def test_every_cli_command_is_documented() -> None:
    commands = section("Commands")
    names = cli_commands()
    assert "collector dlq replay" in names, names  # the walk reached the subcommands
    missing = [name for name in names if not re.search(rf"^### {re.escape(name)}$", commands, re.M)]
    assert not missing, f"commands without a '### ' heading in docs/reference.md: {missing}"


def test_every_status_field_is_documented(tmp_path: Path) -> None:
    document = status.collect(Settings(data_dir=tmp_path))
    fields = section("Status document")
    missing = [key for key in document if not has_row(fields, key)]
    assert not missing, f"status fields without a row in docs/reference.md: {missing}"


def test_every_data_file_is_documented() -> None:
    names = {
        constant: value
        for constant, value in vars(datadir).items()
        if constant.isupper() and isinstance(value, str)
    }
    assert set(DATA_FILE_CONSTANTS) <= set(names), names
    files = section("Data directory")
    missing = [value for value in names.values() if not has_row(files, value)]
    assert not missing, f"data files without a row in docs/reference.md: {missing}"


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for the headings of `path`."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", prose_headings(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def prose_headings(text: str) -> str:
    """`text` without fenced code blocks (whose `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(target)
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"


def test_every_cited_test_exists() -> None:
    defined: dict[Path, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        text = path.read_text()
        defined[path] = set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", text, flags=re.M))
    every = set().union(*defined.values())
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for file, name in re.findall(r"((?:tests/)?(?:unit/)?test_\w+\.py)::(test_\w+)", text):
            path = ROOT / file if file.startswith("tests/") else ROOT / "tests" / file
            if name not in defined.get(path, set()):
                missing.append(f"{doc.name}: {file}::{name}")
        for name in re.findall(r"`::(test_\w+)", text):
            if name not in every:
                missing.append(f"{doc.name}: ::{name}")
    assert not missing, f"cited tests that do not exist: {missing}"
