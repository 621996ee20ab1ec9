"""The API key store: hashed keys with scopes, project/environment limits and expiry.

Keys live in `keys.json` in the data directory, mode 0600, as SHA-256 digests: a key is
a long random secret, so a fast hash is enough and the file never holds a usable key. The
secret is shown once, when the key is made. The server re-reads the file whenever it
changes (checked on each request by its stat signature), so `collector keys create` and
`collector keys revoke` take effect without a restart.

Judging a key: a missing header, a non-Bearer scheme, an unknown, expired or revoked key
is `Unauthorized` (SDKs drop their queue on 401, so only a certain "no"); a key store that
cannot be read is `KeyStoreUnavailable` (503, SDKs retry).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from collector.errors import Forbidden, KeyStoreUnavailable, Unauthorized
from collector.events import Target
from collector.store.datadir import DataDir, atomic_write

# sdk:read (config, resolve, decide) and sdk:write (events) are the Traffical API's own;
# admin:read is the collector's: the whole status document (/v1/stats), paths included.
SCOPES = ("sdk:read", "sdk:write", "admin:read")
SDK_SCOPES = ("sdk:read", "sdk:write")
ADMIN_READ = "admin:read"
SECRET_PREFIX = "traffical_sk_"
PUBLISHABLE_PREFIX = "traffical_pk_"
# 32 random bytes: 256 bits, beyond guessing, so an unsalted SHA-256 digest is safe to store.
SECRET_BYTES = 32
# Characters of the key kept in clear (after its kind prefix) so people can tell keys apart.
SHOWN_CHARS = 6
# An imported key must carry at least this many characters after its prefix to be a secret.
MIN_IMPORTED_CHARS = 16


def now_utc() -> datetime:
    return datetime.now(UTC)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: everything but the secret."""

    name: str
    prefix: str
    hash: str
    scopes: tuple[str, ...]
    project: str | None = None
    env: str | None = None
    expires: str | None = None
    created: str = field(default_factory=lambda: now_utc().isoformat())
    revoked: str | None = None

    def status(self, at: datetime) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and datetime.fromisoformat(self.expires) <= at:
            return "expired"
        return "active"

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"API key '{self.name}' lacks the {scope} scope")

    @property
    def publishable(self) -> bool:
        return self.prefix.startswith(PUBLISHABLE_PREFIX)

    def may_read_stats(self) -> bool:
        """admin:read, or sdk:read on a secret key: never a key shipped in browsers."""
        return ADMIN_READ in self.scopes or ("sdk:read" in self.scopes and not self.publishable)

    @property
    def restricted(self) -> bool:
        """True when the key is limited to a project or an environment."""
        return self.project is not None or self.env is not None

    def require_target(self, target: Target) -> None:
        """Raise Forbidden when the key is limited to another project or environment."""
        if self.project is not None and target.project != self.project:
            raise Forbidden(f"API key '{self.name}' is restricted to project '{self.project}'")
        if self.env is not None and target.env != self.env:
            raise Forbidden(f"API key '{self.name}' is restricted to environment '{self.env}'")


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None without one."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyStore:
    """Reads, judges and edits the keys in one `keys.json` file."""

    def __init__(self, data_dir: DataDir) -> None:
        self.path = data_dir.keys
        self._lock_path = data_dir.keys_lock
        self._signature: tuple[int, int, int] | None = None
        # digest -> (key, its expiry as Unix time or None), parsed once per file change
        self._by_hash: dict[str, tuple[ApiKey, float | None]] = {}

    # --- judging keys (the server's side) ---------------------------------------------

    def authenticate(self, header: str | None) -> ApiKey:
        """The active key named by an Authorization header; raises Unauthorized or 503."""
        token = bearer(header)
        if token is None:
            raise Unauthorized()
        self._refresh()
        wanted = digest(token)
        key, expires_at = self._by_hash.get(wanted, (None, None))
        # The dict lookup finds the candidate; compare_digest makes the final comparison
        # constant-time, so timing says nothing about how much of a guess was right.
        if key is None or not hmac.compare_digest(key.hash, wanted) or key.revoked:
            raise Unauthorized()
        if expires_at is not None and expires_at <= time.time():
            raise Unauthorized()
        return key

    def check_readable(self) -> None:
        """Raise KeyStoreUnavailable unless keys can be judged now (for /readyz)."""
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise KeyStoreUnavailable(f"key store unreadable: {exc.strerror}") from exc
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        keys = self._read()
        self._by_hash = {
            key.hash: (
                key,
                datetime.fromisoformat(key.expires).timestamp() if key.expires else None,
            )
            for key in keys
        }
        self._signature = signature

    def _read(self) -> list[ApiKey]:
        try:
            document = json.loads(self.path.read_text())
            return [_key_from_json(entry) for entry in document["keys"]]
        except OSError as exc:
            raise KeyStoreUnavailable(f"key store unreadable: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyStoreUnavailable(f"key store is corrupt: {exc}") from exc

    # --- editing keys (the CLI's side) --------------------------------------------------

    def list_keys(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        return self._read()

    def create(
        self,
        scopes: list[str],
        *,
        name: str | None = None,
        project: str | None = None,
        env: str | None = None,
        expires: datetime | None = None,
        publishable: bool = False,
        existing: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Make and store a new key (or `existing`, a key the upstream already knows, so
        that one SDK key works for both the collector and the calls it passes upstream);
        returns it with its secret, which is not kept."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {unknown or 'none'}")
        if ADMIN_READ in scopes and (
            publishable or (existing or "").startswith(PUBLISHABLE_PREFIX)
        ):
            raise ValueError(f"a publishable key (shipped in browsers) cannot have {ADMIN_READ}")
        if existing is not None:
            kind = next(
                (k for k in (SECRET_PREFIX, PUBLISHABLE_PREFIX) if existing.startswith(k)), ""
            )
            if not kind or len(existing) < len(kind) + MIN_IMPORTED_CHARS:
                raise ValueError("an imported key must look like traffical_sk_… or traffical_pk_…")
            secret = existing
        else:
            kind = PUBLISHABLE_PREFIX if publishable else SECRET_PREFIX
            secret = kind + secrets.token_urlsafe(SECRET_BYTES)
        prefix = secret[: len(kind) + SHOWN_CHARS]
        with self._locked() as keys:
            if any(key.hash == digest(secret) for key in keys):
                raise ValueError("this key is already in the store")
            name = name or f"key-{prefix[len(kind) :]}"
            if any(key.name == name for key in keys):
                raise ValueError(f"a key named '{name}' already exists")
            key = ApiKey(
                name=name,
                prefix=prefix,
                hash=digest(secret),
                scopes=tuple(sorted(set(scopes))),
                project=project,
                env=env,
                expires=_aware(expires).isoformat() if expires else None,
            )
            keys.append(key)
        return key, secret

    def revoke(self, name_or_prefix: str) -> ApiKey:
        """Revoke the one key with this name or prefix; ValueError if none or several match."""
        if not name_or_prefix:
            raise ValueError("name a key (or give the start of one) to revoke")
        with self._locked() as keys:
            matches = [
                i
                for i, key in enumerate(keys)
                if key.name == name_or_prefix or key.prefix.startswith(name_or_prefix)
            ]
            if not matches:
                raise ValueError(f"no key named or starting with '{name_or_prefix}'")
            if len(matches) > 1:
                raise ValueError(f"'{name_or_prefix}' matches {len(matches)} keys; be more exact")
            revoked = replace(keys[matches[0]], revoked=now_utc().isoformat())
            keys[matches[0]] = revoked
        return revoked

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        """Hold the store's lock, yield its keys for editing, then write them atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self.list_keys()
            yield keys
            self._write(keys)

    def _write(self, keys: list[ApiKey]) -> None:
        document = {"version": 1, "keys": [asdict(key) for key in keys]}
        atomic_write(self.path, json.dumps(document, indent=2).encode())


def ensure_first_key(store: KeyStore) -> str | None:
    """On a first start with no key at all, make one and return its secret (else None)."""
    if store.list_keys():
        return None
    try:
        _, secret = store.create(list(SDK_SCOPES), name="default")
    except ValueError:  # another process made it first
        return None
    return secret


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _key_from_json(entry: dict[str, Any]) -> ApiKey:
    return ApiKey(**{**entry, "scopes": tuple(entry["scopes"])})
