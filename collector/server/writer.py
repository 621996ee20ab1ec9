"""The queue writer process: de-dup, one queue row per group, ids remembered; for every
server process of the data directory at once.

A commit costs an fsync (a few milliseconds), which caps one-commit-per-request at a few
thousand requests per second. So the server processes (one, or `workers` of them) send
their requests' events here over a local socket (`WriterLink`), and one thread commits
everything that arrived while the previous commit ran as one queue row. No timer is
involved: under light load a request is committed at once, under heavy load groups grow by
themselves.

De-duplication happens here too, since both work on a whole group at once: ids already
stored (or repeated within the group) are dropped before the commit, and the new ids are
remembered only after it, in a thread of the writer, while the answer goes back; until
they are, later groups find them in memory, so a retry is still found. A writer killed in
between forgets those ids: a retry may then be stored twice (at-least-once), never an
event lost.

Why a process of its own: parsing and validating keep a server's event loop busy, and
committing keeps the writer busy for about as long; in one process the two share one core
through the GIL (measured: 14 ms of CPU per 1000-event request instead of 8), in two they
use both cores. And with several server processes it is the one place that de-duplicates.
`WriterProcess` starts it, stops it and starts it again if it dies; the writer ignores
SIGTERM and SIGINT (its owner stops it once the servers' pending groups are committed),
and exits by itself when its owner is gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import queue
import secrets
import signal
import struct
import sys
import threading
import time
import types
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.context import AuthenticationError
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec

from collector.errors import CollectorError, QueueBusy, Unavailable
from collector.events import Target
from collector.ops import logs, malloc
from collector.server.counting import Conversions, Note
from collector.store import reconcile, rows
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir
from collector.store.deadletters import QUARANTINED, DeadLetters
from collector.store.ledger import State
from collector.store.seen import SeenIds
from collector.store.spool import Sync

log = logging.getLogger("collector.commit")

# (the client's id or None, where it goes, the event's own JSON bytes): one event of
# `Events`, as `Events.of` takes them and `Events.each` gives them back.
EncodedEvent = tuple[str | None, Target, bytes]
# An event that failed validation, to quarantine: (its JSON bytes as sent, why, the SDK
# that sent it as "name/version").
Invalid = tuple[bytes, str, str]

# Upper bound on the events of one group, so one commit (and the latency of the requests
# in it) stays bounded when many large requests arrive at once: 20 requests of 1000 (a
# group is never less than one request).
MAX_GROUP_EVENTS = 20_000
# And on its bytes, so a few large requests do not make one commit (and the writer's
# memory) the sum of them all: 16 MiB, one and a half of the largest body.
MAX_GROUP_BYTES = 16 * 1024 * 1024
# Groups whose ids may wait to be remembered while later groups are committed (their ids
# are held in memory meanwhile: at most this many groups of MAX_GROUP_EVENTS).
MAX_REMEMBERING = 4
# How often the writer process checks that the process that started it is still there.
PARENT_CHECK_S = 0.5
# How long a process waits for a starting writer to listen (spawning one takes about a
# second here; the one-file build unpacks itself first), and how often it tries meanwhile.
CONNECT_WAIT_S = 30.0
CONNECT_RETRY_S = 0.05
# How often the writer writes the counts of its notes (as often as the servers do theirs).
COUNTS_FLUSH_S = 1.0
# How often at most the writer warns that invalid events could not be quarantined (one
# SDK sending them all day would otherwise write a line per request).
QUARANTINE_WARN_S = 60.0
# How long a stopping owner waits for the writer to commit what it holds and exit.
STOP_WAIT_S = 30.0
# A writer that died is started again at most this often, so a writer that cannot open
# the queue (a disk gone read-only, say) is not restarted in a busy loop.
RESTART_EVERY_S = 1.0


@dataclass(frozen=True)
class WriterConfig:
    data_dir: Path
    sync: Sync
    budget_bytes: int
    dedup_window_s: float
    dedup_max_bytes: int
    quarantine_max_bytes: int = 64 * 1024 * 1024  # settings.quarantine_max_bytes
    counts_window_minutes: int = 60
    log_level: str = "info"  # the writer process configures its own logging (spawned)


@dataclass(frozen=True)
class WriterLink:
    """Where a server process reaches the writer: an abstract unix socket (nothing in the
    file system to clean up), and the secret that proves it was started by the owner."""

    address: str = field(default_factory=lambda: f"\0collector-writer-{secrets.token_hex(8)}")
    authkey: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def connect(self, wait_s: float = 0.0) -> Connection:
        """A connection to the writer, trying for `wait_s` while it starts."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return Client(self.address, "AF_UNIX", authkey=self.authkey)
            except (OSError, EOFError, AuthenticationError):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(CONNECT_RETRY_S)


@dataclass(frozen=True, slots=True)
class Events:
    """One request's valid events, as a server sends them to the writer: their own bytes
    joined by commas (as a row holds them), and each one's length, id (the client's, scoped;
    None: none) and target (one for all of them, as nearly always, or one each).

    One buffer for the events, pickled out of band (`frames`), not a tuple and a bytes
    object per event: for a 1000-event request 0.03 ms of the event loop's time to pickle,
    against 0.31 ms, and no copy of the events into the pickle (measured here)."""

    data: bytes
    lengths: list[int]
    ids: list[str | None]
    targets: tuple[Target, ...]

    @classmethod
    def join(
        cls, raws: Sequence[bytes | msgspec.Raw], ids: list[str | None], targets: Sequence[Target]
    ) -> Events:
        """The events of `raws` (each event's bytes), with their ids and targets."""
        one = bool(targets) and targets.count(targets[0]) == len(targets)  # in C
        found = tuple(targets[:1] if one else targets)
        return cls(b",".join(raws), list(map(len, raws)), ids, found)

    @classmethod
    def of(cls, events: Sequence[EncodedEvent]) -> Events:
        return cls.join(
            [raw for _, _, raw in events],
            [eid for eid, _, _ in events],
            [target for _, target, _ in events],
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def each(self) -> Iterator[EncodedEvent]:
        """Each event as (id, target, its bytes), sliced out of `data`."""
        targets = self.targets * len(self.lengths) if len(self.targets) == 1 else self.targets
        at = 0
        for eid, target, length in zip(self.ids, targets, self.lengths, strict=True):
            yield eid, target, self.data[at : at + length]
            at += length + 1

    def __reduce__(self) -> tuple[Any, ...]:
        # Out of band when pickled with a buffer_callback (`frames`), in band otherwise.
        data = pickle.PickleBuffer(self.data)
        return (Events, (data, self.lengths, self.ids, self.targets))


class GroupWriter:
    """Commits groups of requests' events to the spool, without ids already stored."""

    def __init__(self, config: WriterConfig) -> None:
        data_dir = DataDir(config.data_dir)
        self.spool = reconcile.open_queue(
            data_dir,
            sync=config.sync,
            budget_bytes=config.budget_bytes,
            resume_in_flight=False,  # only the forwarder may resume its in-flight rows
        )
        self.seen = SeenIds(data_dir, config.dedup_window_s, config.dedup_max_bytes, recover=True)
        # The server (or the supervisor of workers) moved a corrupt counts file aside.
        self.counts = Counts.writer(data_dir, config.counts_window_minutes)
        self.conversions = Conversions(self.counts)
        self.quarantine = Quarantine(data_dir, config.quarantine_max_bytes)
        # Ids are remembered, and notes counted, in a thread of their own once their events
        # are committed, so the answer need not wait for it (1.2 ms per 1000 ids, measured:
        # with four clients the writer's commits are what bound throughput). Until they
        # are, the next groups find them here (`_remembering`): waiting for them instead
        # took a quarter of the committing thread's time (1.0 s in 4.4 s busy, measured).
        self._after = ThreadPoolExecutor(max_workers=1, thread_name_prefix="after-commit")
        self._remembering: deque[tuple[Future[None], set[str]]] = deque()
        self._closing = threading.RLock()  # flush_counts (either thread) against close
        self._closed = False

    def close(self) -> None:
        self._settle_remembering()
        with self._closing:
            self.flush_counts()
            self._closed = True
        self._after.shutdown(wait=True)
        self.spool.close()
        self.seen.close()
        self.counts.close()
        self.quarantine.close()

    def flush_counts(self) -> None:
        """Write the counts of the notes counted so far (in the thread that counts them;
        nothing counted since the last time: no transaction); once closed, nothing (the
        timer's thread may call it while `close` shuts the counting thread down)."""
        with self._closing:
            if not self._closed:
                self._after.submit(_logged, self._flush)

    def _flush(self) -> None:
        pending = self.counts.take()
        if pending:
            self.counts.write(pending)
        self.spool.write_witness()

    def commit(
        self,
        requests: list[Events],
        notes: Sequence[Sequence[Note]] = (),
        invalid: Sequence[Invalid] = (),
    ) -> list[list[int]]:
        """Drop known ids, append the rest, then remember their ids and count the requests'
        `notes` (in the background: the next group, and `close`, wait for the ids), and
        quarantine the requests' `invalid` events.

        Returns, per request, the indexes of its events not written (already stored). The
        group is committed, or refused (QueueFull, QueueBusy), as a whole, so no request is
        answered "already held" on the strength of another request's events that were
        refused.
        """
        ids = [eid for events in requests for eid in events.ids if eid]
        # In memory first: a group whose ids are remembered meanwhile is found in the file.
        known = self._being_remembered(ids)
        known |= self.seen.seen(ids)
        groups: dict[Target, rows.Joined] = {}
        duplicates: Counter[Target] = Counter()
        unique = set(ids)
        if not known and len(unique) == len(ids):
            skipped: list[list[int]] = [[] for _ in requests]  # nothing to drop: in bulk
            for events in requests:
                _group_all(groups, events)
        else:
            skipped, ids = _drop_known(requests, known, groups, duplicates)
            unique = set(ids)
        if groups or duplicates:
            self.spool.append(groups, duplicates)
        if invalid:  # only once the group stands: a refused one's client sends them again
            kept = self.quarantine.keep(invalid)
            self._after.submit(_logged, self._count_invalid, invalid, kept)
        if ids:
            self._remembering.append((self._after.submit(self._remember, ids), unique))
        if any(notes):
            self._after.submit(_logged, self._count, notes, skipped, time.monotonic())
        return skipped

    def _count(self, notes: Sequence[Sequence[Note]], skipped: list[list[int]], now: float) -> None:
        for request_notes, request_skipped in zip(notes, skipped, strict=True):
            self.conversions.count(request_notes, request_skipped, now)

    def _count_invalid(self, invalid: Sequence[Invalid], kept: str) -> None:
        """Count quarantined events by SDK (in the thread that adds to and flushes counts)."""
        for (sdk,), n in Counter((sdk,) for _, _, sdk in invalid).items():
            self.counts.add(Count.QUARANTINED, (sdk, kept), n)

    def _remember(self, ids: list[str]) -> None:
        try:
            self.seen.remember(ids)
        except Unavailable as exc:
            # The events are committed, so the answer stays 200; only their ids are
            # forgotten, and a retry may be stored twice (at-least-once).
            log.warning("could not remember %d event ids: %s", len(ids), exc.message)

    def _being_remembered(self, ids: list[str]) -> set[str]:
        """Those of `ids` committed in groups whose ids are not remembered yet: a retry in
        this group must find them. At most MAX_REMEMBERING such groups are kept; past that
        this waits for the oldest."""
        while self._remembering and (
            self._remembering[0][0].done() or len(self._remembering) > MAX_REMEMBERING
        ):
            self._remembering.popleft()[0].result()
        found: set[str] = set()
        for _, remembering in self._remembering:
            found.update(remembering.intersection(ids))
        return found

    def _settle_remembering(self) -> None:
        while self._remembering:
            self._remembering.popleft()[0].result()


class Quarantine:
    """Invalid events kept in the dead-letter store, within `max_bytes` of it; past that
    only counted, with a warning at most every QUARANTINE_WARN_S. A failing store is
    logged: the requests' answers stand (the events were invalid: no retry brings them)."""

    def __init__(self, data_dir: DataDir, max_bytes: int) -> None:
        self.data_dir = data_dir
        self.max_bytes = max_bytes
        self._dead: DeadLetters | None = None  # opened when first needed: a dead-letter
        # file that cannot be opened must not stop the writer (and every commit) at start
        self._warned = -math.inf

    def close(self) -> None:
        if self._dead is not None:
            self._dead.close()

    def keep(self, invalid: Sequence[Invalid]) -> str:
        """Keep `invalid` if there is room; returns "kept", "full" or "failed"."""
        kept = "kept"
        try:
            if self._dead is None:
                self._dead = DeadLetters.writer(self.data_dir)
            if self.max_bytes and self._dead.used_bytes() < self.max_bytes:
                letters = [(raw, QUARANTINED + why, sdk) for raw, why, sdk in invalid]
                self._dead.add_each(letters, State.QUARANTINED)
            else:
                kept = "full"
                self._warn(
                    f"the quarantine is full (quarantine_max_bytes {self.max_bytes}): "
                    f"{len(invalid)} invalid events were counted, not kept"
                )
        except (CollectorError, OSError) as exc:
            kept = "failed"
            why = exc.message if isinstance(exc, CollectorError) else str(exc)
            self._warn(f"could not quarantine {len(invalid)} invalid events: {why}")
        return kept

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= QUARANTINE_WARN_S:
            self._warned = now
            log.warning("%s", message)


def _logged(call: Callable[..., None], *args: Any) -> None:
    """Run `call`, logging its failure: counts are counts, the events stand."""
    try:
        call(*args)
    except Exception as exc:
        log.warning("could not count or write counts: %s", exc)


def _group_all(groups: dict[Target, rows.Joined], events: Events) -> None:
    """Add `events` to their targets' groups: as one run when they share one target, as a
    request's events nearly always do."""
    if len(events.targets) == 1:
        _group(groups, events.targets[0]).add(events.data, events.lengths)
        return
    for _, target, raw in events.each():
        _group(groups, target).add_one(raw)


def _group(groups: dict[Target, rows.Joined], target: Target) -> rows.Joined:
    found = groups.get(target)
    if found is None:
        found = groups[target] = rows.Joined()
    return found


def _drop_known(
    requests: list[Events],
    known: set[str],
    groups: dict[Target, rows.Joined],
    duplicates: Counter[Target],
) -> tuple[list[list[int]], list[str]]:
    """Group the events whose id is neither `known` nor repeated in the group, and count
    the others per target in `duplicates`; returns, per request, the indexes dropped, and
    the ids kept (to remember)."""
    ids: list[str] = []
    skipped: list[list[int]] = []
    for events in requests:
        dropped = []
        for index, (eid, target, raw) in enumerate(events.each()):
            if eid is not None:
                if eid in known:
                    dropped.append(index)
                    duplicates[target] += 1
                    continue
                known.add(eid)
                ids.append(eid)
            _group(groups, target).add_one(raw)
        skipped.append(dropped)
    return skipped, ids


# --- the protocol: each message gets one answer, in order -------------------------------
#
#   ("commit", requests, body bytes)  ->  ("ok", skipped per request) | ("error", CollectorError)
#        each request: (its Events, their notes, its invalid events)
#   ("check",)            ->  ("ok", None)                | ("error", CollectorError)
#   ("stop",)             ->  ("ok", None), once everything before it is committed
#
# A message is the frames of `frames`: its pickle, after the count of the out-of-band
# buffers (`Events.data`) that follow it, each a frame of its own. Answers are plain
# pickles (`Connection.send`).

Message = tuple[Any, ...]
Inbox = queue.Queue[tuple[Connection, Message]]
# multiprocessing.connection's framing: a signed 32-bit big-endian length, or -1 and then
# an unsigned 64-bit one for frames of 2 GiB and more.
LENGTH = struct.Struct("!i")
LONG_LENGTH = struct.Struct("!Q")
# The number of out-of-band buffers that follow a message's pickle, in front of it.
_BUFFERS = struct.Struct("!I")


def frames(message: Message) -> list[bytes | memoryview]:
    """`message` as the writer reads it (`receive`), each payload behind its length: for
    one write of the socket."""
    parts: list[bytes | memoryview] = []
    for payload in _payloads(message):
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size < 0x7FFFFFFF:
            parts.append(LENGTH.pack(size))
        else:
            parts.append(LENGTH.pack(-1) + LONG_LENGTH.pack(size))
        parts.append(payload)
    return parts


def _payloads(message: Message) -> list[bytes | memoryview]:
    """`message`'s pickle, after the count of its out-of-band buffers, then those."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL, buffer_callback=buffers.append)
    return [_BUFFERS.pack(len(buffers)) + data, *(buffer.raw() for buffer in buffers)]


def receive(conn: Connection) -> Message:
    """One message of `frames` from `conn` (EOFError or OSError once it is closed)."""
    head = conn.recv_bytes()
    (count,) = _BUFFERS.unpack_from(head)
    buffers = [conn.recv_bytes() for _ in range(count)]
    message: Message = pickle.loads(memoryview(head)[_BUFFERS.size :], buffers=buffers)
    return message


def send(conn: Connection, message: Message) -> None:
    """Send `message` over a blocking connection (the server's loop writes `frames`)."""
    for payload in _payloads(message):
        conn.send_bytes(payload)


class WriterProcess:
    """The writer process, as its owner (the server, or with workers their supervisor)
    sees it: started, watched, started again if it died, and stopped last."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.link = WriterLink()
        self._process: BaseProcess | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._started_at = time.monotonic()
            # spawn, not fork: the owner has threads (and an event loop) a fork would copy.
            self._process = multiprocessing.get_context("spawn").Process(
                target=_main,
                args=(self.config, self.link, os.getpid()),
                name="collector-writer",
            )
            with _main_module_hidden():
                self._process.start()

    def restart_if_dead(self) -> bool:
        """Start a new writer if this one died (at most every RESTART_EVERY_S); True when
        one was started."""
        with self._lock:
            process = self._process
            if process is None or process.is_alive():
                return False
            if time.monotonic() - self._started_at < RESTART_EVERY_S:
                return False
            log.error("the queue writer process died (%s); starting a new one", process.exitcode)
            process.close()
        self.start()
        return True

    def stop(self) -> None:
        """Have the writer commit what it holds and exit (killed after STOP_WAIT_S)."""
        process = self._process
        if process is None:
            return
        if process.is_alive():
            try:
                with self.link.connect(CONNECT_WAIT_S) as conn:
                    send(conn, ("stop",))
                    conn.recv()
            except (OSError, EOFError, AuthenticationError) as exc:
                log.warning("could not ask the queue writer to stop: %s", exc)
            process.join(STOP_WAIT_S)
            if process.is_alive():
                log.error("the queue writer did not stop in %.0f s; killing it", STOP_WAIT_S)
                process.kill()
                process.join()
        self._process = None


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide the program's main module from multiprocessing while a writer is spawned.

    A spawned child imports its parent's main module before anything else (`python -m cli`,
    the console script): the command line's imports, which the writer needs none of (typer,
    pydantic, the settings: 15 MiB of the writer's 44 MiB at start, measured). With no
    `__spec__` or `__file__` on `__main__`, multiprocessing imports nothing for it; the
    writer's own code comes with its target, `collector.server.writer._main`."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# --- inside the writer process ------------------------------------------------------------


def _main(config: WriterConfig, link: WriterLink, owner_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(config.log_level)  # a spawned process starts with no logging configured
    threading.Thread(target=exit_with, args=(owner_pid,), daemon=True).start()
    # Listen first, so that the servers can connect while the queue is opened (and
    # checked) and their first messages wait for it.
    listener = Listener(link.address, "AF_UNIX", authkey=link.authkey)
    inbox: Inbox = queue.Queue()
    threading.Thread(target=_accept, args=(listener, inbox), daemon=True).start()
    writer = GroupWriter(config)
    threading.Thread(target=_flush_every_second, args=(writer,), daemon=True).start()
    try:
        _serve(writer, inbox)
    finally:
        writer.close()


def _flush_every_second(writer: GroupWriter) -> None:
    while True:
        time.sleep(COUNTS_FLUSH_S)
        writer.flush_counts()
        malloc.trim()  # the groups' freed buffers (`collector/ops/malloc.py`)


def exit_with(owner_pid: int) -> None:
    """End this process once its owner is gone (killed, say), so that nothing is left
    over. What a writer was committing then is committed or rolled back by SQLite, and was
    never answered 200."""
    while os.getppid() == owner_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _accept(listener: Listener, inbox: Inbox) -> None:
    while True:
        try:
            conn = listener.accept()
        except (AuthenticationError, OSError, EOFError) as exc:
            log.warning("refused a connection to the queue writer: %s", exc)
            continue
        threading.Thread(target=_receive, args=(conn, inbox), daemon=True).start()


def _receive(conn: Connection, inbox: Inbox) -> None:
    """Pass each message of `conn` to the committing thread, until its server goes."""
    try:
        while True:
            inbox.put((conn, receive(conn)))
    except (EOFError, OSError):
        conn.close()


def _serve(writer: GroupWriter, inbox: Inbox) -> None:
    """Answer messages until told to stop: everything waiting is taken together, and the
    commits among it are committed as one group."""
    while True:
        taken = [inbox.get()]
        events, size = _weight(taken[0][1])
        while events < MAX_GROUP_EVENTS and size < MAX_GROUP_BYTES:
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                break
            taken.append(item)
            more_events, more_size = _weight(item[1])
            events += more_events
            size += more_size
        commits: list[Commit] = [(c, m[1]) for c, m in taken if m[0] == "commit"]
        if commits:
            _commit(writer, commits)
        stop: list[Connection] = []
        for conn, message in taken:
            if message[0] == "check":
                _answer(conn, _outcome(writer.spool.check_writable))
            elif message[0] == "stop":
                stop.append(conn)
        if stop:
            for conn in stop:
                _answer(conn, ("ok", None))
            return


def _weight(message: Message) -> tuple[int, int]:
    """A message's events and body bytes, which bound a group."""
    if message[0] != "commit":
        return 0, 0
    return sum(len(request[0]) for request in message[1]), message[2]


# A server's group: per request, its events, notes and invalid events.
Commit = tuple[Connection, list[tuple[list[EncodedEvent], list[Note], list[Invalid]]]]


def _commit(writer: GroupWriter, commits: list[Commit]) -> None:
    requests = [request for _, sent in commits for request in sent]
    group = [events for events, _, _ in requests]
    notes = [notes for _, notes, _ in requests]
    invalid = [event for _, _, events in requests for event in events]
    outcome = _outcome(writer.commit, group, notes, invalid)
    start = 0
    for conn, requests in commits:
        if outcome[0] == "ok":
            _answer(conn, ("ok", outcome[1][start : start + len(requests)]))
        else:
            _answer(conn, outcome)
        start += len(requests)


def _outcome(call: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", call(*args))
    except CollectorError as exc:
        return ("error", exc)
    except Exception as exc:
        # Never let the writer die of one group: every server would wait on it.
        log.exception("group commit failed", exc_info=exc)
        return ("error", QueueBusy("queue write failed; retry later"))


def _answer(conn: Connection, answer: tuple[str, Any]) -> None:
    # A server that is gone: what it sent stands (and was never answered 200).
    with contextlib.suppress(OSError):
        conn.send(answer)
