"""forwarder/keys.py: the upstream key of a batch is its exact target's, else its
project's, else the default, else none; `key_chooser` reads them from fresh settings.
"""

from __future__ import annotations

from pathlib import Path

from collector.events import Target
from collector.settings import ProjectKey, Settings
from forwarder.keys import KeyChooser, key_chooser

SCOPED: dict[tuple[str, str | None], str] = {
    ("proj_a", "production"): "key-a-production",
    ("proj_a", None): "key-a-any",
    ("proj_b", "staging"): "key-b-staging",
}


def test_the_exact_target_wins_over_the_project_and_the_default() -> None:
    chooser = KeyChooser("key-default", SCOPED)

    assert chooser.key_for(Target("proj_a", "production")) == "key-a-production"


def test_without_an_exact_key_the_projects_key_is_used() -> None:
    chooser = KeyChooser("key-default", SCOPED)

    assert chooser.key_for(Target("proj_a", "staging")) == "key-a-any"


def test_without_a_key_for_the_project_the_default_is_used() -> None:
    chooser = KeyChooser("key-default", SCOPED)

    assert chooser.key_for(Target("proj_b", "production")) == "key-default"
    assert chooser.key_for(Target("proj_c", "staging")) == "key-default"


def test_with_no_key_at_all_there_is_none() -> None:
    chooser = KeyChooser(None, SCOPED)

    assert chooser.key_for(Target("proj_c", "production")) is None
    assert chooser.key_for(Target("proj_b", "staging")) == "key-b-staging"


def test_the_loader_reads_the_keys_from_the_settings_each_time(tmp_path: Path) -> None:
    secret_file = tmp_path / "proj-b.key"
    secret_file.write_text("key-b-from-file\n")
    settings = [
        Settings(
            data_dir=tmp_path,
            upstream_key="key-default",
            upstream_keys=[
                ProjectKey(project="proj_a", key="key-a"),
                ProjectKey(project="proj_b", env="staging", key_file=secret_file),
            ],
        ),
        Settings(data_dir=tmp_path, upstream_key="key-rotated"),
    ]
    load = key_chooser(lambda: settings.pop(0))

    chooser = load()
    assert chooser.key_for(Target("proj_a", "production")) == "key-a"
    assert chooser.key_for(Target("proj_b", "staging")) == "key-b-from-file"
    assert chooser.key_for(Target("proj_b", "production")) == "key-default"

    reloaded = load()
    assert reloaded.key_for(Target("proj_a", "production")) == "key-rotated"
