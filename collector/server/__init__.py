"""The server process: the HTTP face of the collector, from request bytes to a commit.

    bootstrap.py   start: data directory, ports, first key; one server or `workers`
    serving.py     one server process: the app on uvicorn, systemd notify
    workers.py     several server processes on one port under a supervisor
    app.py         the Litestar app: routes (events straight from ASGI), errors mapped to HTTP
    limits.py      what one connection may cost (head size, deadlines, connection cap)
    auth.py        the API keys (keys.json): judging a key, and editing the store
    ratelimit.py   per-key token buckets, shared by the server processes
    admission.py   request bytes held at once (503 past the budget)
    ingest.py      one events request: decompress, parse, validate, encode
    counting.py    what is counted of each event (on the request path, and in the writer)
    commit.py      group commit, the server's side: requests' events sent in groups
    writer.py      the queue writer process: de-dup, one queue row, ids remembered
    proxy.py       config, resolve and decide passed upstream; the config cache served
    openapi.py     the OpenAPI description of the events API

The 200 is sent only after the commit, so an answered event survives a crash. The server
never imports the forwarder; both meet only in the data directory (`collector.store`).
"""
