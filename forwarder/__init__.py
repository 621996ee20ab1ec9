"""The forwarder process: drains the queue to the upstream, through outages, losing nothing.

    process.py   the process: one per data directory (a lock), signals, systemd
    loop.py      take rows -> sort into batches -> send -> settle (ack or dead-letter)
    batch.py     a batch: events for one target (project, env), with their rows
    keys.py      which upstream key a batch is sent with
    sink.py      the upstream's events API, and what each answer means for a batch
    backoff.py   when to try again: exponential backoff with jitter, one probe in outage

It never imports the server; both meet only in the data directory (`collector.store`).
"""
