"""The edge collector: accepts Traffical events over HTTP and commits them to a durable queue.

The path of an event through this package:

    app.py      HTTP: content type, body size, gzip, key header  -> errors.py types on failure
    auth.py     is the key valid, and may it write events?
    ingest.py   parse the body, validate each event (events.py), check the key's limits
    commit.py   gather concurrent requests into one spool transaction (group commit)
    spool.py    the persist-queue SQLite file: events and the ids already seen, in one commit

The answer 200 is sent only after the commit, so an answered event survives a crash.
"""
