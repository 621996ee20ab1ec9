"""The data directory and everything kept in it: the only importers of sqlite3 and
persist-queue.

    datadir.py       the name of every file, and atomic writes
    db.py            opening a database to write (with recovery) or to read (read-only)
    rows.py          the format of a queue row: how events are stored and read back
    spool.py         the durable queue (persist-queue), with the disk budget and reserve
    seen.py          ids already stored, to drop client retries
    deadletters.py   events that left the queue without an upstream 2xx; replay
    counts.py        rolling counts and totals; every count's name
    configcache.py   SDK config bundles, served through upstream outages
    heartbeats.py    each process's state file; the forwarder's states
    recovery.py      corrupt files moved aside at start, and named to readers

Errors leave the store as `collector.errors` types (`db.translated`), never as SQLite's.
"""
