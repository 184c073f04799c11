"""The WAL's framing and recovery: cut or corrupt the log anywhere, recover up to there."""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.wire.protocol import JobSpec
from shardq_node import records as R
from shardq_node.engine import Engine
from shardq_node.settings import StorageSettings
from shardq_node.snapshot import dump
from shardq_node.storage import Storage, load_snapshot, write_snapshot
from shardq_node.wal import Torn, decode, frame, read_frames, segment_name

from ..helpers import FakeClock


def scripted_engine(seed: int, steps: int = 120) -> tuple[Engine, list[R.Record]]:
    """Drive an engine through a random but reproducible life; return it and its journal."""
    rnd = random.Random(seed)
    clock = FakeClock()
    engine = Engine(clock)
    journal: list[R.Record] = []
    queues = ["a", "b", "c"]
    for i in range(steps):
        clock.advance(rnd.randint(0, 50))
        op = rnd.random()
        queue = rnd.choice(queues)
        try:
            if op < 0.35:
                spec = JobSpec(
                    {"i": i, "s": "x" * rnd.randint(0, 40)},
                    priority=rnd.randint(-2, 2),
                    delay=rnd.choice([0, 0, 30]),
                    ttl=rnd.choice([0, 0, 500]),
                    max_attempts=rnd.choice([0, 1, 2]),
                    backoff=rnd.choice([0, 10]),
                    unique_key=rnd.choice([None, None, f"k{rnd.randint(0, 20)}"]),
                )
                engine.push(queue, [spec], [orjson.dumps(spec.data)])
            elif op < 0.55:
                engine.pull(queue, rnd.randint(1, 3), rnd.randint(1, 3))
            elif op < 0.7 and engine.active:
                engine.ack(rnd.choice(sorted(engine.active)), orjson.dumps({"r": i}))
            elif op < 0.8 and engine.active:
                engine.fail(rnd.choice(sorted(engine.active)), f"e{i}")
            elif op < 0.85 and engine.job_count():
                engine.cancel(rnd.choice(sorted(j.id for j in engine.live_jobs())))
            elif op < 0.9:
                engine.set_queue(queue, paused=rnd.random() < 0.3, rate_limit=rnd.choice([None, 5]))
            elif op < 0.93:
                engine.retry_dlq(queue)
            elif op < 0.96:
                engine.release_owner(rnd.randint(1, 3))
            else:
                engine.tick()
        except Exception as exc:  # refusals (duplicate keys, …) are part of the script
            assert type(exc).__module__ == "shardq.errors", exc
        journal.extend(engine.journal)
        engine.journal.clear()
    return engine, journal


def state_of(engine: Engine) -> list[bytes]:
    """The engine's whole state, comparable across engines (dump time zeroed)."""
    return sorted(
        frame(r if r[0] == R.FINISHED else (r[0], 0, *r[2:])) for r in dump(engine, expand=True)
    )


def replayed(journal: list[R.Record], clock: FakeClock | None = None) -> Engine:
    engine = Engine(clock or FakeClock())
    engine.emitting = False
    for rec in journal:
        engine.apply(decode(frame(rec)[8:]))
    return engine


def write_log(directory: Path, journal: list[R.Record]) -> tuple[bytes, list[int]]:
    """Write ``journal`` as segment 1; return its bytes and each record's end offset."""
    wal = directory / "wal"
    wal.mkdir(parents=True)
    data = b""
    ends = []
    for rec in journal:
        data += frame(rec)
        ends.append(len(data))
    (wal / segment_name(1)).write_bytes(data)
    return data, ends


def recover(directory: Path) -> tuple[Engine, object]:
    storage = Storage(StorageSettings(data_dir=str(directory)))
    engine = Engine(FakeClock())
    report = storage.recover(engine, open_wal=False)
    return engine, report


def test_frames_round_trip_with_raw_payloads() -> None:
    rec = (R.PUSH, 5, "q", [(1025, b'{"a":[1,2]}', 0, 5, 0, 0, 0, 0, None, None, 0)])
    payload = frame(rec)[8:]
    decoded = decode(payload)
    assert decoded[3][0][1] == b'{"a":[1,2]}'
    assert decoded[:3] == [R.PUSH, 5, "q"]


def test_replaying_the_journal_rebuilds_the_same_state() -> None:
    engine, journal = scripted_engine(1, 300)
    assert len(journal) > 100
    assert state_of(replayed(journal, engine.clock)) == state_of(engine)  # type: ignore[arg-type]


def test_snapshot_round_trip_rebuilds_the_same_state(tmp_path: Path) -> None:
    engine, _ = scripted_engine(2, 300)
    path = tmp_path / "s.snap"
    count = write_snapshot(engine, str(path), 7)
    loaded = Engine(engine.clock)
    assert load_snapshot(loaded, path.read_bytes()) == count
    assert state_of(loaded) == state_of(engine)


def test_cut_at_every_byte_of_the_tail_recovers_up_to_the_last_whole_record(
    tmp_path: Path,
) -> None:
    _, journal = scripted_engine(3, 80)
    data, ends = write_log(tmp_path / "src", journal)
    tail_start = ends[-4]
    checked = 0
    for cut in range(tail_start, len(data) + 1):
        d = tmp_path / f"cut{cut}"
        (d / "wal").mkdir(parents=True)
        (d / "wal" / segment_name(1)).write_bytes(data[:cut])
        recovered, report = recover(d)
        whole = sum(1 for e in ends if e <= cut)
        assert report.replayed == whole  # type: ignore[attr-defined]
        assert state_of(recovered) == state_of(replayed(journal[:whole], recovered.clock))
        # the torn tail was cut off, so a later append cannot hide behind it
        assert (d / "wal" / segment_name(1)).stat().st_size == ends[whole - 1]
        checked += 1
    assert checked == len(data) - tail_start + 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), where=st.floats(0, 1), flip=st.integers(1, 255))
def test_a_corrupt_byte_anywhere_stops_recovery_at_that_record(
    tmp_path_factory: pytest.TempPathFactory, seed: int, where: float, flip: int
) -> None:
    d = tmp_path_factory.mktemp("corrupt")
    _, journal = scripted_engine(seed, 40)
    data, ends = write_log(d, journal)
    if not data:
        return
    pos = min(int(where * len(data)), len(data) - 1)
    bad = bytearray(data)
    bad[pos] ^= flip
    (d / "wal" / segment_name(1)).write_bytes(bytes(bad))
    recovered, report = recover(d)
    whole = sum(1 for e in ends if e <= pos)  # records entirely before the damaged byte
    assert report.replayed == whole  # type: ignore[attr-defined]
    assert report.torn  # type: ignore[attr-defined]
    assert state_of(recovered) == state_of(replayed(journal[:whole], recovered.clock))


def test_segments_after_a_damaged_one_are_set_aside(tmp_path: Path) -> None:
    _, journal = scripted_engine(4, 60)
    wal = tmp_path / "wal"
    wal.mkdir()
    half = len(journal) // 2
    first = b"".join(frame(r) for r in journal[:half])
    (wal / segment_name(1)).write_bytes(first[:-3])  # torn end of segment 1
    (wal / segment_name(2)).write_bytes(b"".join(frame(r) for r in journal[half:]))
    _, report = recover(tmp_path)
    assert report.replayed == half - 1  # type: ignore[attr-defined]
    assert not (wal / segment_name(2)).exists()
    assert (wal / (segment_name(2) + ".corrupt")).exists()


def test_read_frames_reports_where_it_stopped() -> None:
    data = frame((R.CANCEL, 1, 5)) + b"\x01\x02"
    got = []
    with pytest.raises(Torn) as info:
        for end, _ in read_frames(data):
            got.append(end)
    assert got == [len(data) - 2]
    assert info.value.offset == len(data) - 2


def test_newest_valid_snapshot_wins_and_a_corrupt_one_is_skipped(tmp_path: Path) -> None:
    engine, journal = scripted_engine(5, 200)
    half = len(journal) // 2
    older = replayed(journal[:half], engine.clock)  # type: ignore[arg-type]
    write_snapshot(older, str(tmp_path / "snapshot-00000002.snap"), 2)
    (tmp_path / "snapshot-00000003.snap").write_bytes(b"garbage that is not a snapshot")
    wal = tmp_path / "wal"
    wal.mkdir()
    (wal / segment_name(2)).write_bytes(b"".join(frame(r) for r in journal[half:]))
    recovered, report = recover(tmp_path)
    assert report.snapshot.endswith("snapshot-00000002.snap")  # type: ignore[attr-defined]
    assert state_of(recovered) == state_of(engine)
    assert os.path.exists(tmp_path / "snapshot-00000003.snap")


def test_a_preallocated_segment_filled_to_within_a_header_of_its_end_is_not_torn() -> None:
    _, journal = scripted_engine(3, 10)
    record = frame(journal[0])
    for zeros in range(1, 8):  # what is left of the segment's preallocated zeros
        frames = [payload for _, payload in read_frames(record + bytes(zeros))]
        assert len(frames) == 1, zeros
    with pytest.raises(Torn):  # a torn header is still one: not zeros
        list(read_frames(record + b"\x05\x00\x00"))
