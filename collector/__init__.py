"""The edge collector: accepts Traffical events over HTTP, commits them to a durable queue
before answering, counts them, and forwards them upstream (the `forwarder` package).

The path of an event, by folder:

    collector/server/    HTTP in: key, limits, parse and validate, group commit  -> 200
    collector/store/     the data directory: queue row, seen ids, counts, dead letters
    forwarder/           queue row -> batch per (project, env) -> upstream -> ack
    collector/ops/       what it is doing: status, metrics, logs, systemd, supervision

Beside them, the base every package may use:

    collector/settings.py   every setting, its default and its meaning
    collector/errors.py     every error type (mapped to HTTP in collector/server/app.py)
    collector/events.py     the wire format: the one definition of a valid event
    collector/upstream.py   the only module that talks HTTP to the upstream

Dependency rules, checked in CI (`lint-imports`, rules in pyproject.toml): `cli.py` on top;
`collector.server` and `forwarder` independent of each other; both above `collector.ops`,
which is above `collector.store` and `collector.upstream`; those above the base modules.
sqlite3 and persist-queue are imported only under `collector.store`, httpx only in
`collector.upstream`.
"""

# The one version, read by pyproject.toml (so the one-file build, which carries no package
# metadata, knows it too).
__version__ = "0.1.0"
