"""A real MQTT broker for tests (Mosquitto from the OS packages), and a late subscriber.

    with Mosquitto() as broker:          # a free port on 127.0.0.1, anonymous, in memory
        ... broker.port ...
        broker.stop(); broker.start()    # down and up again on the same port

CI installs Mosquitto (.ci/run); where it is missing the tests that need it are skipped
with the command that installs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.kafka.local.runtime import free_ports


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


class Mosquitto:
    def __init__(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("Mosquitto is not installed: apt-get install -y mosquitto")
        self.binary = binary
        (self.port,) = free_ports("127.0.0.1", 1, exclude=set())
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()}") from None
                time.sleep(0.05)  # polling the port until the broker listens, with a deadline

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def retained(port: int, pattern: str, count: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """What a subscriber connecting now to `pattern` receives: {topic: message}, at least
    `count` retained messages, with their qos and retain flags."""
    got: dict[str, Any] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"late-{time.monotonic_ns()}")

    def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        c.subscribe(pattern, qos=1)

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.retain:
            got[message.topic] = message
        if len(got) >= count:
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    assert len(got) >= count, f"{len(got)} of {count} retained messages: {sorted(got)}"
    return got
