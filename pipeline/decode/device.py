"""Device id validation: the Kafka key of every input record (CONTRACT.md, Topics)."""

from __future__ import annotations

import re

from pipeline.decode.errors import Reason, invalid, preview

MAX_DEVICE_ID_CHARS = 128
_DEVICE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def device_id(key: bytes | None) -> str:
    """The device id in `key`: UTF-8, 1-128 characters of ``[A-Za-z0-9._:-]``.

    A null or empty key raises RejectedRecord(validate, missing_key); anything else that
    breaks the rule raises RejectedRecord(validate, invalid_key).
    """
    if not key:  # None (null key) or b"" (empty key): no device to attribute the record to
        raise invalid(
            Reason.MISSING_KEY,
            "record has no key; producers must set the key to the device id "
            "(1-128 chars of [A-Za-z0-9._:-])",
        )
    if len(key) > MAX_DEVICE_ID_CHARS:  # allowed chars are ASCII: bytes == chars
        raise invalid(
            Reason.INVALID_KEY,
            f"key is {len(key)} bytes, over the {MAX_DEVICE_ID_CHARS}-character limit for a "
            f"device id (starts {preview(key)}); use a shorter device id",
        )
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            Reason.INVALID_KEY,
            f"key {preview(key)} is not UTF-8 ({exc.reason} at byte {exc.start}); "
            "the key must be the device id as UTF-8 text",
        ) from None
    if _DEVICE_ID.fullmatch(text) is None:
        raise invalid(
            Reason.INVALID_KEY,
            f"key {text[:64]!r} is not a valid device id; use only letters, digits and "
            "the characters . _ : -",
        )
    return text
