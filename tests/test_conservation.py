"""Conservation: whatever happens, every event answered 200 ends upstream or in the
dead-letter store with a reason, and `collector audit` balances.

A randomized schedule (seeded; the seed and the rounds run are printed on failure) of
rounds, each posting events (some invalid, some sent again) and then one fault: a SIGKILL
of the server or of the forwarder, an upstream answering 5xx, resetting connections or
too slow to answer in time, one project's upstream key refused (401) until it is fixed
and reloaded (SIGHUP), a 200 that names some events as rejected, a 400 for some events,
or the queue or dead-letter file corrupted at a restart (moved aside and read back). Then the faults
stop, the queue drains, and everything is checked. The real server, forwarder and an
upstream on 127.0.0.1; `COLLECTOR_CONSERVATION_SEED` replays one schedule.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.store.datadir import DataDir
from collector.store.spool import summary

from conftest import (
    COLLECTOR,
    ROOT,
    Server,
    create_key,
    dlq_list_json,
    event,
    free_port,
    run_cli,
    wait_for,
)
from corrupt import corrupt_recoverably
from test_forward_faults import forwarder_pid
from upstream import Upstream

PROJECTS = ("proj_a", "proj_b")
ENV = "production"
KEYS = {"proj_a": "key-a", "proj_b": "key-b"}
FAULTS = (
    "kill_server",
    "kill_forwarder",
    "upstream_5xx",
    "upstream_reset",
    "upstream_slow",
    "refuse_key_b",
    "fix_key_b",
    "partial_200",
    "reject_400",
    "corrupt_queue",
    "corrupt_dead_letters",
)
SETTINGS = {
    "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
    "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
    "COLLECTOR_STOP_TIMEOUT_SECONDS": "5",
    "COLLECTOR_FORWARD_TIMEOUT_SECONDS": "1",  # so that a slow upstream is a timeout
}
DRAIN_S = 120.0  # the longest the healed collector may take to empty its queue


@dataclass
class ForwardProcess:
    """`collector forward --config FILE` on a data directory."""

    data_dir: Path
    config: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / "forwarder.log"

    def start(self) -> None:
        env = {**os.environ, "COLLECTOR_DATA_DIR": str(self.data_dir), **SETTINGS}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*COLLECTOR, "forward", "--config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        wait_for(
            lambda: process.poll() is not None or forwarder_pid(self.data_dir) == process.pid,
            "the forwarder to start",
            timeout=60,
        )
        assert process.poll() is None, self.log_path.read_text()

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)
        if number in (signal.SIGKILL, signal.SIGTERM):
            self.process.wait(timeout=30)


@dataclass
class Schedule:
    """One run: the collector, the upstream, and what the clients were answered."""

    rng: random.Random
    server: Server
    forwarder: ForwardProcess
    upstream: Upstream
    key_file: Path
    answered: dict[str, dict[str, Any]] = field(default_factory=dict)  # valid, answered 200
    invalid: set[str] = field(default_factory=set)  # invalid events sent (quarantined)
    done: list[str] = field(default_factory=list)  # the rounds' faults, in order

    def post_round(self, round_no: int) -> None:
        events = []
        for i in range(self.rng.randint(20, 300)):
            project = self.rng.choice(PROJECTS)
            events.append(event(id=f"r{round_no}-{i}", projectId=project))
        if self.answered and self.rng.random() < 0.5:  # a client's retry of earlier events
            earlier = sorted(self.answered)
            events += [self.answered[i] for i in self.rng.sample(earlier, min(20, len(earlier)))]
        if self.rng.random() < 0.3:
            events.append(event(id=f"bad-{round_no}", event=""))
        answer = self.server.post({"events": events})
        if answer.status_code == 200:
            bad = {error["index"] for error in answer.json().get("validationErrors", [])}
            for index, sent in enumerate(events):
                if index in bad:
                    self.invalid.add(sent["id"])
                else:
                    self.answered[sent["id"]] = sent

    def fault(self) -> None:
        name = self.rng.choice(FAULTS)
        self.done.append(name)
        getattr(self, name)()

    def kill_server(self) -> None:
        self.server.kill()
        self.server.start()

    def kill_forwarder(self) -> None:
        self.forwarder.signal(signal.SIGKILL)
        self.forwarder.start()

    def upstream_5xx(self) -> None:
        self.upstream.fail(self.rng.choice((500, 502, 503)), times=self.rng.randint(1, 6))

    def upstream_reset(self) -> None:
        self.upstream.drop(times=self.rng.randint(1, 4))

    def upstream_slow(self) -> None:
        self.upstream.slow(1.5)  # past the forward timeout: each request times out
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.upstream.slow(0)

    def refuse_key_b(self) -> None:
        self.key_file.write_text("key-b-revoked\n")
        self.forwarder.signal(signal.SIGHUP)

    def fix_key_b(self) -> None:
        self.key_file.write_text(KEYS["proj_b"] + "\n")
        self.forwarder.signal(signal.SIGHUP)

    def partial_200(self) -> None:
        self.upstream.drop_in_200(self._fresh_ids(), named=True)

    def reject_400(self) -> None:
        self.upstream.reject_ids(self._fresh_ids())

    def _fresh_ids(self) -> list[str]:
        """Some ids of the next round's events (the ones still to be posted)."""
        round_no = len(self.done)
        return [f"r{round_no}-{i}" for i in self.rng.sample(range(20), 3)]

    def corrupt_queue(self) -> None:
        self.corrupt("queue.db")

    def corrupt_dead_letters(self) -> None:
        self.corrupt("dead-letters.db")

    def corrupt(self, name: str) -> None:
        self.forwarder.signal(signal.SIGTERM)
        self.server.stop()  # a clean stop: the write-ahead log is in the file
        if (self.server.data_dir / name).exists():
            corrupt_recoverably(self.server.data_dir / name)
        self.server.start()
        self.forwarder.start()

    def heal(self) -> None:
        self.upstream.ok()
        self.fix_key_b()


@pytest.fixture
def schedule(tmp_path: Path) -> Iterator[Callable[[int], Schedule]]:
    made: list[Schedule] = []

    def make(seed: int) -> Schedule:
        data_dir = tmp_path / "data"
        key_file = tmp_path / "b.key"
        key_file.write_text(KEYS["proj_b"] + "\n")
        upstream = Upstream().start()
        upstream.require_keys({(project, ENV): key for project, key in KEYS.items()})
        config = tmp_path / "collector.toml"
        config.write_text(
            f'upstream_url = "{upstream.url}"\nupstream_key = "{KEYS["proj_a"]}"\n\n'
            f'[[upstream_keys]]\nproject = "proj_b"\nkey_file = "{key_file}"\n'
        )
        server = Server(data_dir, free_port(), dict(SETTINGS))
        server.key = create_key(data_dir, "--scope", "sdk:write", "--name", "conservation")
        server.start()
        forwarder = ForwardProcess(data_dir, config)
        forwarder.start()
        made.append(Schedule(random.Random(seed), server, forwarder, upstream, key_file))
        return made[-1]

    yield make
    for run in made:
        run.server.stop()
        if run.forwarder.process is not None and run.forwarder.process.poll() is None:
            run.forwarder.signal(signal.SIGKILL)
        run.upstream.stop()


def run_rounds(make: Callable[[int], Schedule], rounds: int) -> None:
    seed = int(os.environ.get("COLLECTOR_CONSERVATION_SEED") or random.randrange(2**32))
    run = make(seed)
    try:
        for round_no in range(rounds):
            run.post_round(round_no)
            run.fault()
        run.heal()
        check(run)
        print(  # with -s: the figures the README quotes
            f"conservation: seed {seed}, {rounds} rounds, {len(run.answered)} events"
            f" answered 200, {len(run.invalid)} invalid, faults {dict(Counter(run.done))}"
        )
    except BaseException as exc:
        exc.add_note(
            f"conservation schedule: COLLECTOR_CONSERVATION_SEED={seed}, rounds {run.done}"
        )
        raise


def check(run: Schedule) -> None:
    data_dir = run.server.data_dir
    wait_for(lambda: summary(DataDir(data_dir)).events == 0, "the queue drained", DRAIN_S)
    upstream = set(run.upstream.event_ids())
    letters = {letter["event_id"]: letter for letter in dlq_list_json(data_dir)}
    nowhere = sorted(set(run.answered) - upstream - set(letters))
    assert not nowhere, f"{len(nowhere)} answered events neither upstream nor dead: {nowhere[:5]}"
    assert all(letters[i]["reason"] for i in set(run.answered) & set(letters))
    unkept = [i for i in run.invalid if i not in letters]
    assert not unkept, f"invalid events not quarantined: {unkept}"
    assert all(letters[i]["reason"].startswith("quarantined: ") for i in run.invalid)
    done = run_cli("audit", "--json", data_dir=data_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert httpx.get(f"{run.server.url}/readyz", timeout=10).status_code == 200


def test_every_answered_event_is_upstream_or_dead_lettered_through_random_faults(
    schedule: Callable[[int], Schedule],
) -> None:
    run_rounds(schedule, 12)


@pytest.mark.slow
def test_every_answered_event_is_accounted_for_through_a_hundred_rounds_of_faults(
    schedule: Callable[[int], Schedule],
) -> None:
    run_rounds(schedule, 100)
