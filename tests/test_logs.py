"""Quiet logs under attack (issue 19.5): rate-limited lines, nothing raw from native code."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pipeline.logs import Throttle, native_class, setup_logging
from pipeline.testing import FakeSeconds


def test_throttle_logs_once_a_period_per_key_and_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeSeconds(0.0)
    throttle = Throttle(logging.getLogger("t"), period_s=60, clock=clock)
    with caplog.at_level(logging.INFO, "t"):
        assert throttle.log(logging.WARNING, "a", "bad %s", 1)
        assert not any(throttle.log(logging.WARNING, "a", "bad %s", i) for i in range(500))
        assert throttle.log(logging.WARNING, "b", "other")
        clock.sleep(60)
        assert throttle.log(logging.WARNING, "a", "bad %s", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "bad 1",
        "other",
        "bad 2 (500 more like it in the last 60 s)",
    ]


def test_throttle_forgets_old_keys_rather_than_growing() -> None:
    throttle = Throttle(logging.getLogger("t"), max_keys=8, clock=FakeSeconds(0.0))
    for i in range(1000):
        throttle.log(logging.DEBUG, f"k{i}", "x")
    assert throttle.log(logging.DEBUG, "k999", "x") is False  # the newest is remembered


def test_native_messages_of_one_class_differ_only_in_numbers() -> None:
    assert native_class("Corrupt JPEG data: 12 extraneous bytes") == native_class(
        "Corrupt JPEG data: 9841 extraneous bytes"
    )


def test_kafka_python_slow_task_warnings_stay_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup_logging("INFO")
    selector = logging.getLogger("kafka.net.selector")
    with caplog.at_level(logging.INFO):
        selector.warning("Task %r ran for %.3fs (>%.3fs threshold).", "t", 0.3, 0.1)
        selector.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_corrupt_images_leave_no_raw_native_lines_on_stderr() -> None:
    script = """
import cv2, numpy as np
from pipeline.logs import capture_native_stderr, setup_logging
setup_logging("INFO")
import logging, threading
seen = threading.Event()
class Seen(logging.Handler):
    def emit(self, record):
        seen.set()
logging.getLogger("iotfuse.native").addHandler(Seen())  # before any line can be logged
capture_native_stderr()
ok, jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))
bad = bytearray(jpeg.tobytes()); bad[len(bad) // 2 :] = b"\\x00" * (len(bad) - len(bad) // 2)
ok, png = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))
for _ in range(50):
    cv2.imdecode(np.frombuffer(bytes(bad), np.uint8), cv2.IMREAD_COLOR)
    cv2.imdecode(np.frombuffer(png.tobytes()[:-40], np.uint8), cv2.IMREAD_COLOR)
assert seen.wait(60), "no native message reached the log"
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    raw = [line for line in lines if "native library:" not in line]
    assert raw == []
    assert len(lines) <= 10, lines  # one per class of message, not one per record
