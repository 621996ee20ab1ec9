"""The server process: the HTTP face of the collector, from request bytes to a commit.

    bootstrap.py   start: data directory, first key, uvicorn, systemd notify
    app.py         the Litestar app: routes, and every error type mapped to HTTP
    limits.py      what one connection may cost (head size, deadlines, connection cap)
    auth.py        the API keys (keys.json): judging a key, and editing the store
    ratelimit.py   per-key token buckets
    ingest.py      one events request: decompress, parse, validate, encode
    counting.py    what is counted of each event (rolling counts, on the request path)
    commit.py      group commit in a writer process: de-dup, one queue row, ids remembered
    proxy.py       config, resolve and decide passed upstream; the config cache served
    openapi.py     the OpenAPI description of the events API

The 200 is sent only after the commit, so an answered event survives a crash. The server
never imports the forwarder; both meet only in the data directory (`collector.store`).
"""
