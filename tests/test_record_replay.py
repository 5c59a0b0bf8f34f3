"""record / replay: Kafka -> recording -> Kafka keeps every stream exactly; pacing by an
injected clock; truncated recordings; partition checks; clean stop."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from pipeline.cli import main
from pipeline.commands.recordings import ProgressLine
from pipeline.errors import UserError
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.record import RecordOptions, parse_start, record, record_to_file
from pipeline.kafka.replay import (
    Pacer,
    RecordingScan,
    ReplayError,
    ReplayOptions,
    check_partitions,
    merge_by_time,
    parse_topic_map,
    replay_to_kafka,
    required_partitions,
)
from pipeline.recordings.file import RecordingError, RecordingWriter, open_recording
from pipeline.recordings.summary import summarize
from pipeline.records import Record
from pipeline.settings import KafkaSettings
from pipeline.testing import FakeSeconds
from tests.kafka_util import wait_until

# Recent timestamps: the broker's time retention (7 days, checked 30 s after start and every
# 5 minutes) deletes records stamped further back, even in the active segment.
T0 = (time.time_ns() // 1_000_000_000 - 600) * 1000
HEADERS = (("content-type", b"image/jpeg"), ("dup", b""), ("dup", b"\x00\xff"))


# -- unit tests: pacing, merging, options (no broker) ------------------------------------


def test_pacer_at_10x_asks_for_a_tenth_of_the_recorded_gaps() -> None:
    clock = FakeSeconds()
    pacer = Pacer(10.0, clock, clock.sleep)
    for ts in range(T0, T0 + 3001, 250):  # 3 s of timestamps, a record every 250 ms
        pacer.wait(ts)
    assert clock.sleeps == pytest.approx([0.025] * 12)
    assert sum(clock.sleeps) == pytest.approx(0.3)
    assert pacer.slept_s == pytest.approx(0.3)


def test_pacer_subtracts_time_spent_sending_and_never_waits_for_late_records() -> None:
    clock = FakeSeconds()
    pacer = Pacer(2.0, clock, clock.sleep)
    pacer.wait(T0)
    clock.now += 0.1  # sending took 100 ms
    pacer.wait(T0 + 1000)  # due 0.5 s after the first
    assert clock.sleeps == pytest.approx([0.4])
    clock.now += 2.0  # the broker stalled: records are late now
    pacer.wait(T0 + 2000)
    pacer.wait(T0 + 1500)  # timestamp going backwards
    pacer.wait(-1)  # no timestamp
    assert clock.sleeps == pytest.approx([0.4])
    pacer.wait(T0 + 6000)  # due 3.0 s after the first; the clock is at +2.5 s
    assert clock.sleeps == pytest.approx([0.4, 0.5])


def test_pacer_at_max_speed_never_sleeps() -> None:
    clock = FakeSeconds()
    pacer = Pacer(None, clock, clock.sleep)
    for ts in (T0, T0 + 60_000, T0 + 3_600_000):
        pacer.wait(ts)
    assert clock.sleeps == []
    with pytest.raises(ValueError, match="positive"):
        Pacer(0.0, clock, clock.sleep)


def test_merge_orders_streams_by_time_and_keeps_each_stream_in_file_order() -> None:
    # a recorder wrote partition 0's batch, then partition 1's: merge them by timestamp
    p0 = [Record("t", 0, i, T0 + 10 * i, b"k", b"x") for i in range(5)]
    p1 = [Record("t", 1, i, T0 + 10 * i + 5, b"k", b"y") for i in range(5)]
    odd = [Record("u", 0, 0, T0 + 100, None, b"z"), Record("u", 0, 1, T0 + 1, None, b"z")]
    merged = list(merge_by_time([p0, p1, odd], lookahead_bytes=1 << 20))
    assert [r.timestamp_ms for r in merged if r.topic == "t"] == sorted(
        r.timestamp_ms for r in p0 + p1
    )
    for stream in (p0, p1, odd):  # per-partition order is file order, even going back in time
        assert [
            r for r in merged if (r.topic, r.partition) == (stream[0].topic, stream[0].partition)
        ] == stream
    # a tiny look-ahead still emits everything, each stream in order
    small = list(merge_by_time([p0, p1, odd], lookahead_bytes=1))
    assert sorted(small, key=lambda r: (r.topic, r.partition, r.offset)) == sorted(
        p0 + p1 + odd, key=lambda r: (r.topic, r.partition, r.offset)
    )
    assert [r for r in small if r.partition == 1 and r.topic == "t"] == p1


def test_topic_map_and_partition_checks_explain_the_problem() -> None:
    assert parse_topic_map(["a=b", " c = d "]) == {"a": "b", "c": "d"}
    for bad in (["a"], ["=b"], ["a=b", "a=c"]):
        with pytest.raises(ReplayError, match="topic-map"):
            parse_topic_map(bad)
    scan = RecordingScan(10, {"a": 3, "sim": 0, "c": 1}, None)
    needed = required_partitions(scan, ReplayOptions(topic_map={"a": "x", "c": "x"}))
    assert needed == {"x": 3, "sim": 0}
    check_partitions(needed, {"x": 3, "sim": 1})
    with pytest.raises(ReplayError, match=r"x has 2 but the recording uses partitions 0\.\.2"):
        check_partitions(needed, {"x": 2, "sim": 1})
    with pytest.raises(ReplayError, match="sim do not exist"):
        check_partitions(needed, {"x": 5})
    assert parse_start("earliest") == "earliest" and parse_start(str(T0)) == T0
    with pytest.raises(UserError, match="--from"):
        parse_start("yesterday")


class FakeConsumer:
    """The part of KafkaConsumer the recorder uses, over in-memory partition logs. Each poll
    returns up to two records per unpaused partition, then `grow` more are appended to every
    partition (records produced while recording)."""

    def __init__(self, topic: str, partitions: int, records: int, grow: int = 0) -> None:
        self.logs = {TopicPartition(topic, p): [] for p in range(partitions)}
        self.grow = grow
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        for tp in self.logs:
            self._append(tp, records)

    def _append(self, tp: TopicPartition, n: int) -> None:
        log = self.logs[tp]
        for _ in range(n):
            offset = len(log)
            log.append(
                SimpleNamespace(
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=offset,
                    timestamp=T0 + offset,
                    key=b"k",
                    value=b"v%d" % offset,
                    headers=[("h", None)],
                )
            )

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.logs if tp.topic == topic}

    def assign(self, tps: list[TopicPartition]) -> None:
        assert set(tps) == set(self.logs)

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.positions.update({tp: 0 for tp in tps})

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp]) for tp in tps}

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        out = {}
        for tp, log in self.logs.items():
            batch = log[self.positions[tp] : self.positions[tp] + 2]
            if batch and tp not in self.paused:
                out[tp] = batch
                self.positions[tp] += len(batch)
        for tp in self.logs:
            self._append(tp, self.grow)
        return out


def test_until_end_records_exactly_the_offsets_below_the_end_at_start(tmp_path: Path) -> None:
    consumer = FakeConsumer("t", partitions=3, records=5, grow=3)
    with RecordingWriter(tmp_path / "r.iotrec") as writer:
        result = record(consumer, writer, RecordOptions(("t",), until_end=True), threading.Event())
    assert result.stop_reason == "end" and result.records == 15
    got = streams(read_file(tmp_path / "r.iotrec"))
    assert {stream: [entry[0] for entry in entries] for stream, entries in got.items()} == {
        ("t", p): [0, 1, 2, 3, 4] for p in range(3)
    }
    assert consumer.paused == set(consumer.logs)  # finished partitions are not fetched
    assert got[("t", 0)][0][4] == (("h", b""),)  # a null header value is kept as empty


def test_recorder_flushes_every_interval_and_stops_after_the_duration(tmp_path: Path) -> None:
    consumer = FakeConsumer("t", partitions=1, records=0, grow=2)
    clock = FakeSeconds()
    polls: list[int] = []

    def progress(records: int, _bytes: int) -> None:
        polls.append(writer.blocks_written)
        clock.now += 0.5  # each poll round takes half a second

    with RecordingWriter(tmp_path / "r.iotrec") as writer:
        options = RecordOptions(("t",), duration_s=10.0, flush_interval_s=2.0)
        result = record(consumer, writer, options, threading.Event(), progress, clock)
    assert result.stop_reason == "duration"
    assert polls == [k // 4 for k in range(20)]  # a block every 4 rounds of 0.5 s
    assert writer.blocks_written == 5  # and the last one on close
    assert result.records == 2 * 20 - 2  # the records appended after the last poll wait


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line_on_a_terminal_and_periodic_lines_otherwise() -> None:
    for stream, expected_lines in ((Terminal(), 1), (io.StringIO(), 3)):
        clock = FakeSeconds()
        line = ProgressLine("record", stream, clock=clock)
        for second in range(1, 13):  # 12 s of updates, 4 per second
            for _ in range(4):
                clock.now += 0.25
                line(second * 1000, second * 2_000_000)
        line.finish(12_000, 24_000_000)
        text = stream.getvalue()
        assert text.count("\n") == expected_lines, text  # terminal: only the final newline
        last = text.rstrip("\n").split("\n")[-1].split("\r")[-1]
        assert "12,000 records, 24.0 MB, 1,000 records/s, 2.0 MB/s, 12.0 s" in last
    assert text.count("\r") == 0 and "2.0 MB/s" in text.splitlines()[0]  # every 5 s


# -- helpers for the broker tests --------------------------------------------------------


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        admin.wait_for_topics(list(names), timeout_ms=30000)
    finally:
        admin.close()


def produce_exact(bootstrap: str, records: list[Record]) -> list[Record]:
    """Produce to the records' own partitions; returns them with the broker's offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [
        producer.send(
            r.topic,
            key=r.key,
            value=r.value,
            headers=list(r.headers),
            timestamp_ms=r.timestamp_ms,
            partition=r.partition,
        )
        for r in records
    ]
    producer.flush()
    out = [
        replace(r, offset=f.get(timeout=30).offset) for r, f in zip(records, futures, strict=True)
    ]
    producer.close()
    return out


def known_records(topics: list[str], per_partition: int = 12, seed: int = 7) -> list[Record]:
    """Keys (some null), headers (duplicates, empty), null and empty values, 3 partitions,
    timestamps interleaved across partitions and going back once within one."""
    rng = random.Random(seed)
    out = []
    for t_index, topic in enumerate(topics):
        for p in range(3):
            for i in range(per_partition):
                ts = T0 + 250 * i + 40 * p + 7 * t_index - (600 if (p, i) == (1, 5) else 0)
                key = None if i % 5 == 4 else f"cell-{(i + p) % 4}".encode()
                value = (
                    None
                    if (i == 3 and key is not None)
                    else b""
                    if i == 6
                    else rng.randbytes(rng.randrange(1, 3000))
                )
                out.append(Record(topic, p, -1, ts, key, value, HEADERS[: i % 4]))
    return out


def read_file(path: Path) -> list[Record]:
    with open_recording(path) as reader:
        records = list(reader)
        assert not reader.truncated
    return records


def streams(
    records: Iterable[Record], rename: dict[str, str] | None = None
) -> dict[tuple[str, int], list[tuple[object, ...]]]:
    """(topic, partition) -> the records' (offset, timestamp, key, value, headers) in order."""
    out: dict[tuple[str, int], list[tuple[object, ...]]] = {}
    for r in records:
        topic = (rename or {}).get(r.topic, r.topic)
        out.setdefault((topic, r.partition), []).append(
            (r.offset, r.timestamp_ms, r.key, r.value, r.headers)
        )
    return out


def rewrite_topics(src: Path, dst: Path, rename: dict[str, str]) -> None:
    with RecordingWriter(dst) as writer:
        for r in read_file(src):
            writer.write(replace(r, topic=rename.get(r.topic, r.topic)))


def recorded_count(path: Path) -> int:
    try:
        with open_recording(path) as reader:
            return sum(1 for _ in reader)
    except (OSError, RecordingError):  # not created yet
        return 0


# -- real broker ---------------------------------------------------------------------------


@pytest.mark.kafka
def test_record_replay_record_reproduces_every_stream(
    bootstrap: str, topics: TopicNames, tmp_path: Path
) -> None:
    sources = [topics.camera, topics.telemetry]
    targets = [f"{t}.replayed" for t in sources]
    create_topics(bootstrap, targets)
    produced = produce_exact(bootstrap, known_records(sources))
    assert {r.partition for r in produced} == {0, 1, 2}

    first, second = tmp_path / "first.iotrec", tmp_path / "second.iotrec"
    assert (
        main(
            [
                "record",
                "--bootstrap-servers",
                bootstrap,
                "--topics",
                *sources,
                "--out",
                str(first),
                "--until-end",
            ]
        )
        == 0
    )
    assert streams(read_file(first)) == streams(produced)

    mapping = [f"{s}={t}" for s, t in zip(sources, targets, strict=True)]
    assert (
        main(
            [
                "replay",
                str(first),
                "--bootstrap-servers",
                bootstrap,
                "--max-speed",
                "--topic-map",
                *mapping,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "record",
                "--bootstrap-servers",
                bootstrap,
                "--topics",
                *targets,
                "--out",
                str(second),
                "--until-end",
            ]
        )
        == 0
    )

    back = dict(zip(targets, sources, strict=True))
    assert streams(read_file(second), rename=back) == streams(produced)
    rewrite_topics(second, tmp_path / "mapped.iotrec", back)
    assert summarize(tmp_path / "mapped.iotrec").digest == summarize(first).digest
    assert summarize(second).digest != summarize(first).digest  # topic names are hashed


@pytest.mark.kafka
def test_replay_at_10x_asks_the_pacer_for_a_tenth_of_the_span(
    bootstrap: str, topics: TopicNames, tmp_path: Path
) -> None:
    path = tmp_path / "paced.iotrec"
    records = [
        Record("src", p, i, T0 + 100 * p + 300 * i, b"k", b"v%d" % i)
        for p in range(3)
        for i in range(10)
    ]  # ~3 s of timestamps, a partition at a time
    unsendable = Record("src", 0, 10, T0 + 50, None, None)  # kafka-python refuses these
    with RecordingWriter(path) as writer:
        for r in [*records, unsendable]:
            writer.write(r)
    clock = FakeSeconds()
    options = ReplayOptions(speed=10.0, topic_map={"src": topics.audio})
    result = replay_to_kafka(
        path,
        KafkaSettings(bootstrap_servers=bootstrap),
        options,
        threading.Event(),
        clock=clock,
        sleep=clock.sleep,
    )
    assert result.records == 30 and result.skipped == 1
    assert not result.stopped and result.truncated_at is None
    stamps = [r.timestamp_ms for r in records]
    span_s = (max(stamps) - min(stamps)) / 1000
    assert sum(clock.sleeps) == pytest.approx(span_s / 10)
    assert clock.sleeps == pytest.approx([0.01] * 29)  # merged by time: every 100 ms

    out = tmp_path / "out.iotrec"
    record_to_file(
        KafkaSettings(bootstrap_servers=bootstrap),
        RecordOptions((topics.audio,), until_end=True),
        out,
        threading.Event(),
    )
    got = streams(read_file(out), rename={topics.audio: "src"})
    assert got == streams(records)


@pytest.mark.kafka
def test_truncated_recording_replays_its_whole_blocks_and_says_so(
    bootstrap: str, topics: TopicNames, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.iotrec"
    records = [Record("src", i % 3, i // 3, T0 + i, b"cell-1", bytes(500)) for i in range(30)]
    with RecordingWriter(path) as writer:
        for i, r in enumerate(records):
            writer.write(r)
            if i % 10 == 9:
                writer.flush()  # three blocks of ten records
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)  # the last block is cut short
    assert (
        main(
            [
                "replay",
                str(path),
                "--bootstrap-servers",
                bootstrap,
                "--max-speed",
                "--topic-map",
                f"src={topics.camera}",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "cut short at byte" in err and "last whole block" in err

    out = tmp_path / "out.iotrec"
    record_to_file(
        KafkaSettings(bootstrap_servers=bootstrap),
        RecordOptions((topics.camera,), until_end=True),
        out,
        threading.Event(),
    )
    got = streams(read_file(out), rename={topics.camera: "src"})
    assert got == streams(records[:20])


@pytest.mark.kafka
def test_replay_refuses_topics_with_too_few_partitions(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = f"narrow-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [narrow], partitions=2)
    path = tmp_path / "wide.iotrec"
    with RecordingWriter(path) as writer:
        for p in range(3):
            writer.write(Record("src", p, 0, T0, b"k", b"v"))
    assert (
        main(
            ["replay", str(path), "--bootstrap-servers", bootstrap, "--topic-map", f"src={narrow}"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"{narrow} has 2 but the recording uses partitions 0..2" in err
    assert main(["replay", str(path), "--bootstrap-servers", bootstrap]) == 1
    assert "src do not exist" in capsys.readouterr().err
    # nothing was sent
    out = tmp_path / "out.iotrec"
    result = record_to_file(
        KafkaSettings(bootstrap_servers=bootstrap),
        RecordOptions((narrow,), until_end=True),
        out,
        threading.Event(),
    )
    assert result.records == 0


@pytest.mark.kafka
def test_record_from_a_timestamp_and_stop_writes_the_pending_records(
    bootstrap: str, topics: TopicNames, tmp_path: Path
) -> None:
    produced = produce_exact(
        bootstrap,
        [
            Record(topics.labels, p, -1, T0 + 1000 * i, b"k", b"%d" % i)
            for p in range(3)
            for i in range(8)
        ],
    )
    stop = threading.Event()
    seen: list[int] = []

    def progress(records: int, _bytes: int) -> None:
        seen.append(records)
        if records >= 15:
            stop.set()  # like SIGTERM: no flush happened yet (interval one hour)

    options = RecordOptions(
        (topics.labels,), start=T0 + 3000, flush_interval_s=3600, duration_s=30
    )  # a bound, should progress never reach 15
    out = tmp_path / "from.iotrec"
    result = record_to_file(
        KafkaSettings(bootstrap_servers=bootstrap), options, out, stop, progress
    )
    assert result.stop_reason == "stopped"
    expected = [r for r in produced if r.timestamp_ms >= T0 + 3000]
    assert streams(read_file(out)) == streams(expected)


@pytest.mark.kafka
def test_record_command_stops_cleanly_on_sigterm(
    bootstrap: str, topics: TopicNames, tmp_path: Path
) -> None:
    produced = produce_exact(
        bootstrap,
        [Record(topics.events, p, -1, T0 + i, b"k", b"v") for p in range(3) for i in range(5)],
    )
    out = tmp_path / "live.iotrec"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "record",
            "--bootstrap-servers",
            bootstrap,
            "--topics",
            topics.events,
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": "."},
    )
    try:
        wait_until(
            lambda: recorded_count(out) == len(produced) or proc.poll() is not None,
            30,
            "the recorder's first flush",
        )
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    assert streams(read_file(out)) == streams(produced)
