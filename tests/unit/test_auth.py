"""collector/server/auth.py: reading a Bearer header, and a real key store in tmp_path:
keys created, judged, revoked and expired; what the file holds; what a key may do.
"""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from collector.errors import Forbidden, KeyStoreUnavailable, Unauthorized
from collector.events import Target
from collector.server.auth import SECRET_PREFIX, KeyStore, bearer, digest, ensure_first_key
from collector.store.datadir import DataDir


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer traffical_sk_x-y_z", "traffical_sk_x-y_z"),
        ("Bearer ", None),
        ("Bearer", None),
        ("Bearerabc", None),
        ("Basic abc", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_reads_the_token_of_a_bearer_header_only(
    header: str | None, token: str | None
) -> None:
    assert bearer(header) == token


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(DataDir(tmp_path))


def test_a_created_key_authenticates_with_its_secret_and_nothing_else(store: KeyStore) -> None:
    key, secret = store.create(["sdk:write"], name="web")

    assert secret.startswith(SECRET_PREFIX)
    assert store.authenticate(f"Bearer {secret}") == key
    assert key.name == "web" and key.scopes == ("sdk:write",)
    assert key.prefix == secret[: len(SECRET_PREFIX) + 6]
    for wrong in (None, "", f"Basic {secret}", f"Bearer {secret}x", "Bearer traffical_sk_nope"):
        with pytest.raises(Unauthorized):
            store.authenticate(wrong)


def test_the_key_file_is_private_and_holds_no_secret(store: KeyStore, tmp_path: Path) -> None:
    _, secret = store.create(["sdk:read", "sdk:write"], name="svc")

    text = store.path.read_text()
    assert secret not in text
    assert json.loads(text)["keys"][0]["hash"] == digest(secret)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_a_revoked_key_no_longer_authenticates_in_the_same_store(store: KeyStore) -> None:
    key, secret = store.create(["sdk:write"], name="old")
    _, other = store.create(["sdk:write"], name="kept")
    assert store.authenticate(f"Bearer {secret}") == key  # judged once, then revoked

    revoked = store.revoke("old")

    assert revoked.revoked is not None
    assert revoked.status(datetime.now(UTC)) == "revoked"
    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {secret}")
    assert store.authenticate(f"Bearer {other}").name == "kept"


def test_a_key_is_revoked_by_its_prefix_but_never_when_several_match(store: KeyStore) -> None:
    key, secret = store.create(["sdk:write"])
    store.create(["sdk:write"], name="other")

    with pytest.raises(ValueError, match="matches 2 keys"):
        store.revoke(SECRET_PREFIX)
    with pytest.raises(ValueError, match="no key"):
        store.revoke("nobody")
    assert store.revoke(key.prefix).name == key.name
    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {secret}")


def test_an_expired_key_is_unauthorized_and_an_unexpired_one_is_not(store: KeyStore) -> None:
    now = datetime.now(UTC)
    _, expired = store.create(["sdk:write"], name="expired", expires=now - timedelta(seconds=1))
    _, current = store.create(["sdk:write"], name="current", expires=now + timedelta(hours=1))

    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {expired}")
    assert store.authenticate(f"Bearer {current}").name == "current"
    assert {key.name: key.status(now) for key in store.list_keys()} == {
        "expired": "expired",
        "current": "active",
    }


def test_a_key_made_elsewhere_is_seen_without_a_restart(tmp_path: Path, store: KeyStore) -> None:
    _, first = store.create(["sdk:write"], name="first")
    store.authenticate(f"Bearer {first}")

    _, later = KeyStore(DataDir(tmp_path)).create(["sdk:write"], name="later")  # `keys create`

    assert store.authenticate(f"Bearer {later}").name == "later"


def test_without_a_readable_key_store_no_key_can_be_judged(store: KeyStore) -> None:
    with pytest.raises(KeyStoreUnavailable):
        store.authenticate("Bearer anything")

    store.path.write_text("{ not json")
    with pytest.raises(KeyStoreUnavailable, match="corrupt"):
        store.authenticate("Bearer anything")
    with pytest.raises(Unauthorized):  # no header at all: certainly no key
        store.authenticate(None)


def test_bad_scopes_names_and_imported_keys_are_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="scopes"):
        store.create(["sdk:admin"])
    with pytest.raises(ValueError, match="scopes"):
        store.create([])
    store.create(["sdk:write"], name="taken")
    with pytest.raises(ValueError, match="already exists"):
        store.create(["sdk:write"], name="taken")
    with pytest.raises(ValueError, match="must look like"):
        store.create(["sdk:write"], existing="traffical_sk_short")

    imported = "traffical_pk_" + "a" * 20
    key, secret = store.create(["sdk:read"], existing=imported)
    assert secret == imported
    assert store.authenticate(f"Bearer {imported}") == key
    with pytest.raises(ValueError, match="already in the store"):
        store.create(["sdk:read"], existing=imported, name="again")


def test_a_key_may_do_only_what_its_scopes_and_limits_allow(store: KeyStore) -> None:
    key, _ = store.create(["sdk:read"], project="proj_a", env="production")

    key.require("sdk:read")
    with pytest.raises(Forbidden, match="sdk:write"):
        key.require("sdk:write")
    assert key.restricted
    key.require_target(Target("proj_a", "production"))
    with pytest.raises(Forbidden, match="project 'proj_a'"):
        key.require_target(Target("proj_b", "production"))
    with pytest.raises(Forbidden, match="environment 'production'"):
        key.require_target(Target("proj_a", "staging"))
    unrestricted, _ = store.create(["sdk:write"])
    assert not unrestricted.restricted


def test_the_first_key_is_made_once(store: KeyStore) -> None:
    secret = ensure_first_key(store)

    assert secret is not None
    assert store.authenticate(f"Bearer {secret}").scopes == ("sdk:read", "sdk:write")
    assert ensure_first_key(store) is None
    assert len(store.list_keys()) == 1
