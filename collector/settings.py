"""Every setting of the collector: its name, default and meaning, in one place.

Settings come from, in rising precedence: a TOML file (`--config FILE`, or
`/etc/collector/collector.toml` when it exists), environment variables named
`COLLECTOR_<NAME>`, and command-line flags. `docs/reference.md` lists every one (a test
checks that it does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from collector.errors import ConfigFileError

DEFAULT_CONFIG_FILE = Path("/etc/collector/collector.toml")

GIB = 1024**3
MIB = 1024**2
# Server processes at most: each holds ~100 MiB and a connection to the one writer, whose
# commits (one fsync each) bound throughput long before 64 processes would.
MAX_WORKERS = 64
# Settings whose values are never printed (`collector config show`).
SECRET_SETTINGS = frozenset({"upstream_key"})
MASK = "********"


def default_data_dir() -> Path:
    """`$STATE_DIRECTORY` under systemd (its first entry), else `./collector-data`."""
    state = os.environ.get("STATE_DIRECTORY", "")
    first = state.split(":")[0]
    return Path(first) if first else Path("collector-data")


class ProjectKey(BaseModel):
    """An upstream key for one project (and optionally one environment), from the TOML file."""

    model_config = ConfigDict(extra="forbid")

    project: str
    env: str | None = None
    key: SecretStr | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ProjectKey:
        if (self.key is None) == (self.key_file is None):
            raise ValueError("give exactly one of key or key_file")
        return self


class Settings(BaseSettings):
    """The collector's settings; each one's `description` is its documentation."""

    model_config = SettingsConfigDict(env_prefix="COLLECTOR_", extra="forbid")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory holding the queue, the key store and the counts.",
    )
    host: str = Field("127.0.0.1", description="Address the server binds; loopback by default.")
    port: int = Field(8787, ge=0, le=65535, description="TCP port the server listens on.")
    health_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of a second listener that serves only /healthz, /readyz and "
        "/metrics, for a kubelet's probes and Prometheus while events stay on `host`; "
        "none (the default): no second listener.",
    )
    health_host: str = Field(
        "0.0.0.0",
        description="Address the health listener binds (with health_port): all of them by "
        "default, so that a kubelet can probe the pod's IP.",
    )
    metrics_labels: Literal["full", "fixed"] = Field(
        "full",
        description="Labels on /metrics: full (orgs, projects, envs, event names, layers, "
        "policies and allocations, as sent by clients), or fixed (only labels of fixed "
        "values, such as status and type; every figure summed over the rest), for a "
        "/metrics reachable by others (health_port on a pod IP).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (comma separated); none by default.",
    )
    upstream_url: str | None = Field(None, description="Base URL of the upstream events API.")
    upstream_key: SecretStr | None = Field(None, description="API key sent to the upstream.")
    upstream_key_file: Path | None = Field(
        None,
        description="File holding the upstream key; relative paths are looked up in "
        "$CREDENTIALS_DIRECTORY (systemd credentials) when it is set.",
    )
    upstream_keys: list[ProjectKey] = Field(
        default_factory=list,
        description="Per project/environment upstream keys (TOML file only).",
    )
    proxy_config_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Time allowed for a config call passed upstream before the cached bundle "
        "is served (below the SDKs' own 10 s, so a stale answer reaches them in time).",
    )
    proxy_decide_timeout_seconds: float = Field(
        2.0, gt=0, description="Time allowed for a resolve or decide call passed upstream."
    )
    config_cache_max_entries: int = Field(
        1000, ge=0, description="Config bundles kept on disk (per project, env and key); 0: none."
    )
    proxy_max_answer_bytes: int = Field(
        16 * MIB,
        ge=1024,
        description="Largest answer of the upstream to a config, resolve or decide call "
        "read; a larger one is 502 (the config is then served from the cache, if held).",
    )
    config_cache_max_bytes: int = Field(
        64 * MIB, ge=0, description="Bytes of config bundles kept on disk."
    )
    config_cache_max_stale_seconds: float = Field(
        7 * 24 * 3600,
        gt=0,
        description="A cached bundle is served during an outage only if the upstream "
        "accepted its key within this time.",
    )
    forward_in_flight: int = Field(2, ge=1, le=64, description="Upstream requests at once.")
    forward_batch_bytes: int = Field(
        4 * MIB, gt=0, description="Largest upstream request body, before compression."
    )
    forward_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Time allowed for one upstream request, from connecting to the last "
        "byte of the answer.",
    )
    retry_initial_seconds: float = Field(
        0.5, gt=0, description="First retry delay (grows exponentially, with full jitter)."
    )
    retry_max_seconds: float = Field(60.0, gt=0, description="Longest delay between retries.")
    max_event_age_seconds: float = Field(
        7 * 24 * 3600,
        gt=0,
        description="Events queued longer than this whose delivery fails are dead-lettered.",
    )
    unconfirmed_events: Literal["count", "dead_letter"] = Field(
        "count",
        description="A 2xx from the upstream that accepts fewer events than sent without "
        "naming the rest in validationErrors: count: they are counted as unconfirmed (status "
        "warns, collector_events_unconfirmed counts them) and settled; dead_letter: the "
        "batch's events are kept in the dead-letter store too, for `collector dlq replay` "
        "(the upstream then gets its accepted events again, de-duplicated by id).",
    )
    stop_timeout_seconds: float = Field(
        10.0,
        ge=0,
        description="On stop (SIGTERM), how long the server's requests in progress and the "
        "forwarder's upstream requests may take to finish; past it they are cut and the "
        "process exits 1.",
    )
    sync: Literal["full", "normal"] = Field(
        "full",
        description="full: fsync every commit (survives power loss); "
        "normal: no fsync per commit (survives a process crash only).",
    )
    disk_budget_bytes: int = Field(
        GIB,
        gt=0,
        description="Bytes of the data directory's databases (the queue, and the dead "
        "letters, seen ids, counts and config cache beside it) past which the server answers "
        "503 and stores nothing.",
    )
    dedup_window_seconds: float = Field(
        24 * 3600, ge=0, description="How long an event id is remembered to drop client retries."
    )
    # ~80 bytes an id with its index (measured: 40,000 uuid ids took 3.2 MB): 128 MiB holds
    # ~1.6 million ids, the whole window up to ~19 events/s and the last ~27 minutes at
    # 1,000/s, which covers SDK retries (seconds to minutes apart).
    dedup_max_bytes: int = Field(
        128 * MIB,
        gt=0,
        description="Most bytes seen-ids.db may take (at most a quarter of "
        "disk_budget_bytes is used): past it the oldest ids are forgotten before the dedup "
        "window ends (a warning says so), so a retry older than the ids kept may be stored "
        "twice, never lost.",
    )
    quarantine_max_bytes: int = Field(
        64 * MIB,
        ge=0,
        description="Most bytes the dead-letter store may take for quarantined events (ones "
        "that fail validation at ingest, kept with the reason and the SDK that sent them); "
        "past it further invalid events are only counted (a warning says so); 0: none kept.",
    )
    # SDKs drop a whole batch on a 400, and a browser SDK with a larger queue flushes it in
    # one request (1490 events seen), so the limit is far above what SDKs send by default
    # (1000 at most); `max_body_bytes` bounds the memory (10 MiB is ~19,000 SDK events).
    max_events_per_request: int = Field(
        10_000, ge=1, description="Most events one request may hold; past it: 400."
    )
    max_body_bytes: int = Field(
        10 * MIB, gt=0, description="Largest request body accepted, after decompression."
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request head (request line and headers); past it: 431, closed.",
    )
    request_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Time a client has to send a request's headers (from its first byte, or "
        "from connecting), and again its body; past it: 408, closed. Idle new connections "
        "are closed after it.",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Client connections open at once, per server process (see workers); "
        "more are closed on arrival.",
    )
    max_request_bytes_in_flight: int = Field(
        16 * MIB,
        ge=1024,
        description="Request body bytes the server holds at once across all connections "
        "(read, parsed, waiting for their commit), per server process; past it a request is "
        "answered 503 with Retry-After before its body is read. At least max_body_bytes.",
    )
    commit_timeout_seconds: float = Field(
        8.0,
        gt=0,
        description="How long an events request waits for its commit (a stalled disk) "
        "before it is answered 503 with Retry-After; below the SDKs' 10 s timeout, so they "
        "retry instead of giving up. A commit that finishes later stands.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Server processes taking requests on the one port, sharing one queue "
        "writer: more than 1 uses more cores on a host that aggregates many app servers.",
    )
    rate_limit_per_second: float = Field(
        0.0,
        ge=0,
        description="Events requests per second each API key may make (a token bucket); "
        "over it: 429 with Retry-After. 0: no rate limit.",
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Requests a key may make at once; 0: one second's worth (>= 1)."
    )
    counts_window_minutes: int = Field(
        60, ge=1, le=24 * 60, description="Minutes of per-minute counts kept for status."
    )
    sample_ratio_p_threshold: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="A policy's split is a sample-ratio mismatch when the chi-square p value "
        "is below this.",
    )
    sample_ratio_min_exposures: int = Field(
        100, ge=1, description="Exposures of a policy in the window before its split is checked."
    )
    event_future_margin_seconds: float = Field(
        300.0,
        gt=0,
        description="An event stamped more than this many seconds ahead of its arrival is "
        "counted as from the future (a client clock ahead).",
    )
    event_late_after_seconds: float = Field(
        86400.0,
        gt=0,
        description="An event stamped more than this many seconds before its arrival is "
        "counted as late.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe log level written."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _room_for_one_body(self) -> Settings:
        if self.max_request_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"max_request_bytes_in_flight ({self.max_request_bytes_in_flight}) must be "
                f"at least max_body_bytes ({self.max_body_bytes})"
            )
        return self

    @model_validator(mode="after")
    def _two_ports(self) -> Settings:
        if self.health_port is not None and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port ({self.port})")
        return self

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"must be an http:// or https:// URL with a host, like "
                    f"https://sdk.traffical.io, not {value!r}"
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) beat the environment, which beats the TOML file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def shown(self) -> dict[str, Any]:
        """Every setting's effective value as JSON values, secrets masked."""
        values = self.model_dump(mode="json")
        values["data_dir"] = str(self.data_dir.absolute())  # the one it would use, from here
        for name in SECRET_SETTINGS:
            if values[name]:
                values[name] = MASK
        values["upstream_keys"] = [
            {**entry, "key": MASK if entry["key"] else None} for entry in values["upstream_keys"]
        ]
        return values

    def upstream_key_value(self) -> str | None:
        """The default upstream key, from `upstream_key` or `upstream_key_file`."""
        if self.upstream_key is not None:
            return self.upstream_key.get_secret_value()
        if self.upstream_key_file is not None:
            return read_secret(self.upstream_key_file)
        return None

    def upstream_problems(self) -> list[tuple[str, str]]:
        """(setting, what is wrong) for upstream settings that cannot work together:
        reading the key files they name, and an upstream with no key to send it."""
        try:
            default = self.upstream_key_value()
            scoped = self.project_key_values()
        except ConfigFileError as exc:
            return [("upstream_key_file", str(exc))]
        if self.upstream_url and default is None and not scoped:
            return [
                (
                    "upstream_key",
                    f"upstream_url is {self.upstream_url} but no key is set to send it "
                    "(upstream_key, upstream_key_file or upstream_keys)",
                )
            ]
        return []

    def project_key_values(self) -> dict[tuple[str, str | None], str]:
        """(project, env or None for any) -> upstream key, from `upstream_keys`."""
        keys = {}
        for entry in self.upstream_keys:
            if entry.key is not None:
                keys[(entry.project, entry.env)] = entry.key.get_secret_value()
            elif entry.key_file is not None:
                keys[(entry.project, entry.env)] = read_secret(entry.key_file)
        return keys


def read_secret(path: Path) -> str:
    """A secret from a file, stripped; relative paths resolve in $CREDENTIALS_DIRECTORY."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and credentials:
        path = Path(credentials) / path
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigFileError(f"cannot read secret file {path}: {exc.strerror}") from exc
    if not secret:
        raise ConfigFileError(f"secret file {path} is empty")
    return secret


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from the TOML file, the environment and `flags` (None values are unset flags)."""
    path = config_file
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None and not path.is_file():
        raise ConfigFileError(f"config file not found: {path}")

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return FromFile(**{name: value for name, value in flags.items() if value is not None})
    except ValueError as exc:
        if exc.__class__.__name__ == "TOMLDecodeError":
            raise ConfigFileError(f"{path}: {exc}") from exc
        raise
