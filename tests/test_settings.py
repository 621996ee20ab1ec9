"""Settings: the TOML file, then the environment, then flags; `config check` and `show`."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.errors import ConfigFileError
from collector.settings import load_settings

from conftest import run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_beat_the_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "c.toml", 'port = 1111\nhost = "127.0.0.2"\nsync = "normal"\n')
    monkeypatch.setenv("COLLECTOR_PORT", "2222")
    monkeypatch.setenv("COLLECTOR_HOST", "127.0.0.3")

    settings = load_settings(config, port=3333)

    assert settings.port == 3333  # flag over environment over file
    assert settings.host == "127.0.0.3"  # environment over file
    assert settings.sync == "normal"  # file over default
    assert load_settings(config).port == 2222


def test_the_data_dir_defaults_to_the_systemd_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLLECTOR_DATA_DIR", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    assert load_settings(write(tmp_path / "e.toml", "")).data_dir == tmp_path / "state"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert load_settings(write(tmp_path / "e.toml", "")).data_dir == Path("collector-data")


def test_secrets_are_read_from_files_and_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "upstream-key").write_text("traffical_sk_from_credentials\n")
    (tmp_path / "web.key").write_text("traffical_sk_web\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = write(
        tmp_path / "c.toml",
        'upstream_key_file = "upstream-key"\n'
        f'[[upstream_keys]]\nproject = "web"\nkey_file = "{tmp_path / "web.key"}"\n',
    )

    settings = load_settings(config)

    assert settings.upstream_key_value() == "traffical_sk_from_credentials"
    assert settings.project_key_values() == {("web", None): "traffical_sk_web"}


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "c.toml", 'upstream_key_file = "/nope/key"\n'))
    with pytest.raises(ConfigFileError, match="/nope/key"):
        settings.upstream_key_value()


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'port = 9000\nupstream_url = "https://up.example"\nupstream_key = "traffical_sk_k"\n',
    )
    done = run_cli("config", "check", "--config", str(config), data_dir=tmp_path / "data")
    assert done.returncode == 0, done.stderr
    assert "settings ok" in done.stdout


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("prot = 9000\n", "prot"),
        ('port = "many"\n', "port"),
        ('sync = "sometimes"\n', "sync"),
        ("[[upstream_keys]]\nenv = 'x'\n", "upstream_keys"),
        ('upstream_key_file = "/nope/key"\n', "/nope/key"),
        ("port = [\n", "c.toml"),
    ],
)
def test_config_check_refuses_a_bad_file_naming_what_is_wrong(
    tmp_path: Path, text: str, named: str
) -> None:
    config = write(tmp_path / "c.toml", text)
    done = run_cli("config", "check", "--config", str(config), data_dir=tmp_path / "data")
    assert done.returncode == 2
    assert named in done.stderr


def test_config_check_names_a_missing_file(tmp_path: Path) -> None:
    done = run_cli("config", "check", "--config", str(tmp_path / "none.toml"), data_dir=tmp_path)
    assert done.returncode == 2 and "none.toml" in done.stderr


def test_config_show_prints_the_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'upstream_key = "traffical_sk_secret_value"\n'
        '[[upstream_keys]]\nproject = "web"\nkey = "traffical_sk_other_secret"\n',
    )
    done = run_cli(
        "config", "show", "--config", str(config), data_dir=tmp_path, env={"COLLECTOR_PORT": "9123"}
    )
    assert done.returncode == 0, done.stderr
    assert "port = 9123" in done.stdout
    assert "secret" not in done.stdout
    assert 'upstream_key = "********"' in done.stdout
