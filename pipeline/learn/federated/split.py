"""Deal recordings out to simulated sites: one recording per site, as real sites would hold.

    paths = split_recordings([Path("train.iotrec")], sites=4, mode="by-class-skew",
                             out=Path("sites"), settings=settings)

- by-device: every device (a device id within one recording) goes whole to one site,
  round robin in sorted order. The class mix of every site is about the same (IID).
- by-class-skew: every labelled span of a device (one episode of the labels topic) goes to
  one site, drawn from that class's share over the sites; the shares are drawn from a
  Dirichlet(alpha) distribution per class (the usual way to simulate non-IID federated
  data: alpha 0.5 gives each site a few dominant classes, a large alpha approaches IID).
  A site thus sees some devices' fires and other devices' intrusions, as sites of
  different trades do.

Records outside any labelled span follow their device (by-device rule). Deterministic for
a seed.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import UserError
from pipeline.records import Record
from pipeline.settings import Settings

SplitMode = Literal["by-device", "by-class-skew"]
Span = tuple[int, int, str]  # start_ms, end_ms, label


def scan(path: Path, labels_topic: str) -> tuple[list[str], dict[str, list[Span]]]:
    """(the devices, sorted; device -> its labelled spans, sorted). Malformed label records
    are skipped here as training skips them (with a warning there)."""
    from pipeline.recordings.file import read_records

    devices: set[str] = set()
    spans: dict[str, list[Span]] = {}
    for record in read_records(path):
        device = (record.key or b"").decode("utf-8", "replace")
        if record.topic != labels_topic:
            devices.add(device)
            continue
        try:
            data = json.loads(record.value or b"")
            span = (int(data["start_ms"]), int(data["end_ms"]), str(data["label"]))
        except (ValueError, KeyError, TypeError):
            continue
        bisect.insort(spans.setdefault(device, []), span)
    return sorted(devices), spans


def class_shares(
    classes: Sequence[str], sites: int, alpha: float, seed: int
) -> dict[str, np.ndarray]:
    """Per class, its share over the sites [sites] ~ Dirichlet(alpha)."""
    rng = np.random.default_rng(seed)
    return {c: rng.dirichlet(np.full(sites, alpha)) for c in sorted(classes)}


def split_recordings(
    paths: Sequence[Path],
    sites: int,
    mode: SplitMode,
    out: Path,
    settings: Settings,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Path]:
    """Write out/site-<k>.iotrec for k in 0..sites-1; returns their paths."""
    from pipeline.recordings.file import RecordingError, RecordingWriter, read_records

    if sites < 1:
        raise UserError(f"--sites must be >= 1, got {sites}")
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"site-{k}.iotrec" for k in range(sites)]
    writers = [RecordingWriter(t, overwrite=True) for t in targets]
    written = [0] * sites
    try:
        for index, path in enumerate(paths):
            devices, spans = scan(path, settings.topics.labels)
            if mode == "by-device":
                spans = {}
            classes = {s[2] for got in spans.values() for s in got}
            shares = class_shares(sorted(classes), sites, alpha, seed + index)
            rng = np.random.default_rng(seed + 7919 * (index + 1))
            owner: dict[tuple[str, int], int] = {}  # (device, span start) -> site
            for device in sorted(spans):
                for start, _end, label in spans[device]:
                    owner[(device, start)] = int(rng.choice(sites, p=shares[label]))
            for record in read_records(path):
                device = (record.key or b"").decode("utf-8", "replace")
                site = _site_of(record, device, spans, owner, devices, sites, settings)
                writers[site].write(record)
                written[site] += 1
    except FileNotFoundError as exc:
        raise UserError(f"recording {exc.filename} does not exist") from None
    except (RecordingError, OSError) as exc:
        raise UserError(f"cannot split the recordings: {exc}") from exc
    finally:
        for w in writers:
            w.close()
    empty = [str(t) for t, n in zip(targets, written, strict=True) if n == 0]
    if empty:
        raise UserError(f"sites without any record: {empty}; use fewer sites or more devices")
    return targets


def _site_of(
    record: Record,
    device: str,
    spans: dict[str, list[Span]],
    owner: dict[tuple[str, int], int],
    devices: list[str],
    sites: int,
    settings: Settings,
) -> int:
    got = spans.get(device)
    if got:
        if record.topic == settings.topics.labels:
            try:
                start = int(json.loads(record.value or b"")["start_ms"])
                return owner.get((device, start), _by_device(device, devices, sites))
            except (ValueError, KeyError, TypeError):
                return _by_device(device, devices, sites)
        i = bisect.bisect_right(got, (record.timestamp_ms, 2**63, "")) - 1
        if i >= 0 and got[i][0] <= record.timestamp_ms < got[i][1]:
            return owner[(device, got[i][0])]
    return _by_device(device, devices, sites)


def _by_device(device: str, devices: list[str], sites: int) -> int:
    i = bisect.bisect_left(devices, device)
    if i < len(devices) and devices[i] == device:
        return i % sites
    return sum(device.encode()) % sites  # a key the summary did not list (not a device)
