"""The read side and the process plumbing, shared by the server, the forwarder and the CLI.

    status.py       the status document, read from the data directory alone
    statusview.py   the status document as tables, for a person
    srm.py          the sample-ratio check (chi-square)
    expected.py     the split a config bundle expects of each static policy
    metrics.py      Prometheus metrics from the counts and the status document
    notify.py       systemd's notify protocol: READY, STOPPING, watchdog
    supervisor.py   `collector run`'s forwarder child, restarted if it dies
    logs.py         one line per event worth knowing: for people, or JSON

Nothing here imports the server or the forwarder.
"""
