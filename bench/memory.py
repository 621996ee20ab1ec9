"""Peak memory of the server (and its queue writer process) and of the forwarder.

One data directory, one `collector serve`, one `collector forward` (default settings,
`sync=full`) and a fast local upstream (`bench/forward.py`'s), all on 127.0.0.1, through
four phases; before each, every process's peak RSS is reset (`/proc/PID/clear_refs`), so
each phase's figure is its own:

    batches   sustained ingest of 1000-event requests over 4 connections, as fast as they
              are answered, while the forwarder drains to the upstream (steady state)
    singles   sustained ingest of 1-event requests over 64 connections, forwarder draining
    backlog   the forwarder is stopped and batches are posted for a while: the queue grows
              (the server's memory must not grow with it) up to the disk budget
              (`--budget-mib`, 256 MiB here so that a short run reaches it)
    refusing  batches keep coming with the budget reached: every one is answered 503
              (the path where cyclic garbage once piled up: 1.2 GB in a minute)
    drain     a fresh forwarder drains that backlog to the upstream, with no new load

Reported per phase and process: peak RSS (VmHWM) and RSS sampled at the phase's start,
middle and end, plus what the phase did (events/s in, backlog size, drain rate). Memory is
bounded when the peaks do not grow with the phase's length or the backlog's size: compare
runs with different `--duration` and `--backlog-seconds`.

Run it by hand (it is not part of the test suite):

    python bench/memory.py [--duration S] [--backlog-seconds S] [--budget-mib M] [--warmup S]

It stops its processes and removes its temporary directory on exit, Ctrl-C included.
Load only ever targets 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import uvloop
from forward import proc_status, queue_rows, start, stop, wait_for_upstream
from ingest import (
    BATCH_POOL,
    SINGLE_POOL,
    Scenario,
    Server,
    build_pool,
    child_env,
    cpu_model,
    drive,
    filesystem_of,
    free_port,
    note,
    stopped_by_signals,
)

from collector.store.spool import TABLE

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MIB = 1024 * 1024
SAMPLE_S = 0.25  # how often RSS is sampled
DRAIN_TIMEOUT_S = 600.0
BATCHES = Scenario("batch", 1000, 4, BATCH_POOL)
SINGLES = Scenario("single", 1, 64, SINGLE_POOL)
PROCESSES = ("server", "writer", "forwarder")

# persist-queue's table for the collector's queue named "events" (collector/store/spool.py).
QUEUE_TABLE = "ack_queue_events"


@dataclass
class Phase:
    name: str
    what: str = ""
    peak: dict[str, int] = field(default_factory=dict)  # process -> VmHWM bytes
    samples: dict[str, list[int]] = field(default_factory=dict)  # process -> RSS bytes


class Sampler:
    """Samples the RSS of named pids every SAMPLE_S in a thread, for one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: dict[str, list[int]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        for pid in self.pids.values():
            reset_peak(pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                rss = proc_status(pid).get("VmRSS")
                if rss:
                    self.samples[name].append(rss)
            if self._stop.wait(SAMPLE_S):
                return

    def finish(self, phase: Phase) -> Phase:
        for name, pid in self.pids.items():
            phase.peak[name] = proc_status(pid).get("VmHWM", 0)
        phase.samples = self.samples
        return phase


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs; needs the same user)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        note(f"cannot reset the peak RSS of {pid} ({exc}): peaks count from its start")


def writer_of(server_pid: int) -> int:
    """The server's queue writer: its child started by multiprocessing's spawn."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes()
            if int(fields[1]) == server_pid and b"spawn_main" in cmdline:
                return int(entry.name)
    raise RuntimeError(f"no queue writer process under the server {server_pid}")


def ingest(server: Server, api_key: str, scenario: Scenario, seconds: float, warmup: float) -> str:
    pool = build_pool(scenario, server.port, api_key, seed=int(time.time()))
    args = argparse.Namespace(duration=seconds, warmup=warmup)
    result = uvloop.run(drive(pool, server.port, scenario, server, args))
    errors = f", {result.errors} errors {dict(result.statuses)}" if result.errors else ""
    return (
        f"{result.events_s:,.0f} events/s in ({result.requests_s:,.0f} requests/s, "
        f"p99 {result.percentile_ms(0.99):.0f} ms){errors}"
    )


def run(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    data_dir = workdir / "data"
    config = workdir / "collector.toml"
    config.write_text("")  # an empty file: /etc/collector/collector.toml is never read
    common = ["--config", str(config), "--data-dir", str(data_dir)]
    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--scope", "sdk:write", *common],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = created.stdout.strip().splitlines()[-1]

    up_port = free_port()
    serve_upstream = [sys.executable, str(ROOT / "bench" / "forward.py"), "--serve-upstream"]
    upstream = start(
        [*serve_upstream, "--port", str(up_port)], workdir / "upstream.log", child_env()
    )
    serve = [sys.executable, "-m", "cli", "serve", *common]
    budget = {"COLLECTOR_DISK_BUDGET_BYTES": str(args.budget_mib * MIB)}
    server = Server("collector", serve, {**child_env(), **budget}, workdir)
    forwarder_env = {
        **child_env(),
        "COLLECTOR_UPSTREAM_URL": f"http://{HOST}:{up_port}",
        "COLLECTOR_UPSTREAM_KEY": "traffical_sk_bench",
        "COLLECTOR_LOG_LEVEL": "warning",
    }
    forwarder_argv = [sys.executable, "-m", "cli", "forward", *common]
    forwarder: subprocess.Popen[bytes] | None = None
    client = httpx.Client(base_url=f"http://{HOST}:{up_port}", timeout=10)
    phases: list[Phase] = []
    try:
        wait_for_upstream(client, upstream)
        server.start()
        assert server.proc is not None
        forwarder = start(forwarder_argv, workdir / "forwarder.log", forwarder_env)
        pids = {
            "server": server.proc.pid,
            "writer": writer_of(server.proc.pid),
            "forwarder": forwarder.pid,
        }
        note(f"server {pids['server']} (writer {pids['writer']}), forwarder {forwarder.pid}")

        for scenario, name in ((BATCHES, "batches"), (SINGLES, "singles")):
            note(f"{name}: {scenario.label()} for {args.duration:g} s, forwarder draining")
            with Sampler(pids) as sampler:
                what = ingest(server, api_key, scenario, args.duration, args.warmup)
            phases.append(sampler.finish(Phase(f"{name} ({args.duration:g} s)", what)))
        wait_drained(data_dir, forwarder)

        note(f"backlog: forwarder stopped, batches for {args.backlog_seconds:g} s")
        stop(forwarder)
        server_pids = {name: pid for name, pid in pids.items() if name != "forwarder"}
        with Sampler(server_pids) as sampler:
            what = ingest(server, api_key, BATCHES, args.backlog_seconds, 0.0)
        backlog_events = queued_events(data_dir)
        queue_mib = sum(p.stat().st_size for p in data_dir.glob("queue.db*")) / MIB
        backlog = f"{what}; {backlog_events:,} events queued ({queue_mib:,.0f} MiB)"
        phases.append(sampler.finish(Phase(f"backlog ({args.backlog_seconds:g} s)", backlog)))

        note(f"refusing: batches for {args.duration:g} s with the disk budget reached")
        with Sampler(server_pids) as sampler:
            what = ingest(server, api_key, BATCHES, args.duration, 0.0)
        phases.append(sampler.finish(Phase(f"refusing ({args.duration:g} s)", what)))

        note(f"drain: a fresh forwarder drains {backlog_events:,} events")
        before = orjson.loads(client.get("/stats").content)["events"]
        began = time.monotonic()
        forwarder = start(forwarder_argv, workdir / "forwarder-drain.log", forwarder_env)
        pids["forwarder"] = forwarder.pid
        with Sampler(pids) as sampler:
            wait_drained(data_dir, forwarder)
            drained = orjson.loads(client.get("/stats").content)["events"] - before
            seconds = time.monotonic() - began
        what = f"{drained:,} events in {seconds:.1f} s ({drained / seconds:,.0f} events/s)"
        phases.append(sampler.finish(Phase("drain", what)))
    finally:
        client.close()
        stop(forwarder)
        server.stop()
        stop(upstream)
    return phases


def queued_events(data_dir: Path) -> int:
    conn = sqlite3.connect(f"file:{data_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        (events,) = conn.execute(
            f"SELECT COALESCE(SUM(json_array_length(data)), 0) FROM {TABLE}"
        ).fetchone()
        return int(events)
    finally:
        conn.close()


def wait_drained(data_dir: Path, forwarder: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while queue_rows(data_dir, QUEUE_TABLE):
        if forwarder.poll() is not None:
            raise RuntimeError(f"the forwarder exited with status {forwarder.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the queue did not drain")
        time.sleep(SAMPLE_S)


def report(phases: list[Phase], args: argparse.Namespace, workdir: Path) -> None:
    print()
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; data dir on {filesystem_of(workdir)}")
    print(
        "collector settings: defaults (sync=full, forward_in_flight=2) but "
        f"disk_budget_bytes={args.budget_mib} MiB"
    )
    print()
    header = f"{'phase':<18} {'process':<10} {'peak RSS':>9} {'RSS start / middle / end':>26}"
    print(header)
    print("-" * len(header))
    for phase in phases:
        for process in PROCESSES:
            if process not in phase.peak:
                continue
            samples = phase.samples.get(process) or [0]
            trend = " / ".join(
                f"{samples[i] / MIB:.0f}" for i in (0, len(samples) // 2, len(samples) - 1)
            )
            print(
                f"{phase.name:<18} {process:<10} {phase.peak[process] / MIB:>6.0f} MiB "
                f"{trend:>22} MiB"
            )
        print(f"{'':<18} {phase.what}")
    print()
    top = {p: max(phase.peak.get(p, 0) for phase in phases) for p in PROCESSES}
    print(
        "highest peak RSS: "
        + ", ".join(f"{process} {top[process] / MIB:.0f} MiB" for process in PROCESSES)
        + f" (server + writer {(top['server'] + top['writer']) / MIB:.0f} MiB)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Peak memory of the server and the forwarder.")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per ingest phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--backlog-seconds", type=float, default=20.0, help="seconds of batches building a backlog"
    )
    parser.add_argument(
        "--budget-mib", type=int, default=256, help="the server's disk budget (MiB)"
    )
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the data dir goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="collector-memory-bench-", dir=args.tmp_dir))
    try:
        with stopped_by_signals():
            phases = run(args, workdir)
        report(phases, args, workdir)
    except KeyboardInterrupt:
        note("interrupted; processes stopped and temporary files removed")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
