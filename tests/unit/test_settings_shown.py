"""collector/settings.py: `Settings.shown()` prints every setting with every secret masked
(the default upstream key and each per-project key), and nothing else masked.
"""

from __future__ import annotations

import json
from pathlib import Path

from collector.settings import MASK, ProjectKey, Settings


def test_shown_masks_the_upstream_key_and_every_project_key(tmp_path: Path) -> None:
    key_file = tmp_path / "proj-c.key"
    key_file.write_text("secret-from-file")
    settings = Settings(
        data_dir=tmp_path,
        upstream_url="https://upstream.example",
        upstream_key="secret-default",
        upstream_keys=[
            ProjectKey(project="proj_a", key="secret-a"),
            ProjectKey(project="proj_b", env="staging", key="secret-b"),
            ProjectKey(project="proj_c", key_file=key_file),
        ],
    )

    shown = settings.shown()

    assert shown["upstream_key"] == MASK
    assert [entry["key"] for entry in shown["upstream_keys"]] == [MASK, MASK, None]
    assert shown["upstream_keys"][1]["env"] == "staging"
    assert shown["upstream_keys"][2]["key_file"] == str(key_file)
    assert shown["upstream_url"] == "https://upstream.example"
    assert shown["data_dir"] == str(tmp_path)
    text = json.dumps(shown)  # all JSON values
    assert "secret" not in text
    # the values themselves are still there for the processes that need them
    assert settings.upstream_key_value() == "secret-default"
    assert settings.project_key_values()[("proj_c", None)] == "secret-from-file"


def test_shown_without_secrets_masks_nothing(tmp_path: Path) -> None:
    shown = Settings(data_dir=tmp_path).shown()

    assert shown["upstream_key"] is None
    assert shown["upstream_keys"] == []
    assert MASK not in json.dumps(shown)
    assert set(shown) == set(Settings.model_fields)
