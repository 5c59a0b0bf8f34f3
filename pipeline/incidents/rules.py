"""When an incident opens and closes, per class: thresholds and window counts from settings.

    rules = IncidentRules.from_settings(settings.incidents, window_ms=2000)
    rules.rule("fire")   # ClassRule(open=0.5, close=0.25, k=2, n=3, m=3), or None: never opens

A class's score in a window is a *hit* at or above `open`; an incident opens once `k` of
the device's last `n` windows (in event time) are hits, and closes after `m` windows in a
row below `close` (a missing window counts as below). `close <= open` is the hysteresis:
a score between the two keeps an open incident open and opens nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.settings import IncidentSettings


class IncidentRuleError(UserError):
    """incidents.* settings that cannot work together."""


@dataclass(frozen=True, slots=True)
class ClassRule:
    open: float = 0.5  # a window's score >= open is a hit
    close: float = 0.25  # a window's score < close counts towards closing
    k: int = 2  # hits ...
    n: int = 3  # ... among the last n windows open an incident
    m: int = 3  # windows in a row below `close` close it (the defaults: docs/performance.md)

    def check(self, name: str) -> ClassRule:
        """Itself, or an IncidentRuleError saying what to change."""
        where = f"incidents rule for {name}"
        if not 0.0 <= self.close <= self.open <= 1.0:
            raise IncidentRuleError(
                f"{where}: need 0 <= close ({self.close}) <= open ({self.open}) <= 1"
            )
        if not 1 <= self.k <= self.n:
            raise IncidentRuleError(f"{where}: need 1 <= k ({self.k}) <= n ({self.n})")
        if self.n > MAX_WINDOWS or self.m > MAX_WINDOWS or self.m < 1:
            raise IncidentRuleError(
                f"{where}: n ({self.n}) and m ({self.m}) must be 1..{MAX_WINDOWS}"
            )
        return self


MAX_WINDOWS = 64  # n and m at most: a device's state holds its last n windows
_KEYS = {"open": "open", "close": "close", "k": "k", "n": "n", "m": "m"}
_PAIR = re.compile(r"^\s*([a-z]+)\s*=\s*([0-9.]+)\s*$")


@dataclass(frozen=True, slots=True)
class IncidentRules:
    default: ClassRule = field(default_factory=ClassRule)
    per_class: Mapping[str, ClassRule] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset({"normal"})
    window_ms: int = 2000
    idle_close_ms: int = 10000
    update_every: int = 5

    def rule(self, cls: str) -> ClassRule | None:
        """The rule of `cls`, or None for a class that never opens an incident."""
        if cls in self.ignored:
            return None
        return self.per_class.get(cls, self.default)

    @property
    def history_windows(self) -> int:
        """How many of a device's last windows any rule looks at."""
        return max([self.default.n, *(r.n for r in self.per_class.values())])

    @classmethod
    def from_settings(cls, s: IncidentSettings, window_ms: int) -> IncidentRules:
        default = ClassRule(
            s.open_threshold, s.close_threshold, s.open_k, s.open_n, s.close_m
        ).check("every class")
        if s.idle_close_ms < 0 or s.update_every < 0:
            raise IncidentRuleError(
                "incidents.idle_close_ms and incidents.update_every must be >= 0"
            )
        return cls(
            default=default,
            per_class=parse_per_class(s.per_class, default),
            ignored=frozenset(c.strip() for c in s.ignore_classes.split(",") if c.strip()),
            window_ms=window_ms,
            idle_close_ms=s.idle_close_ms,
            update_every=s.update_every,
        )


def parse_per_class(text: str, default: ClassRule) -> dict[str, ClassRule]:
    """`"fire: open=0.4 close=0.25 k=1 n=1; intrusion: m=3"` -> a rule per class, each
    key not given taken from `default`."""
    out: dict[str, ClassRule] = {}
    for part in filter(str.strip, text.split(";")):
        name, colon, body = part.partition(":")
        name = name.strip()
        if not colon or not name:
            raise IncidentRuleError(
                f"incidents.per_class: {part.strip()!r} is not CLASS: key=value ...; e.g. "
                '"fire: open=0.4 close=0.25 k=1 n=1; intrusion: m=3"'
            )
        changes: dict[str, float | int] = {}
        for pair in body.replace(",", " ").split():
            match = _PAIR.match(pair)
            if match is None or match.group(1) not in _KEYS:
                raise IncidentRuleError(
                    f"incidents.per_class: {name}: {pair!r} is not one of open=, close=, k=, "
                    "n=, m= with a number"
                )
            key, value = match.group(1), match.group(2)
            try:
                changes[key] = float(value) if key in ("open", "close") else int(value)
            except ValueError:
                raise IncidentRuleError(
                    f"incidents.per_class: {name}: {key} must be "
                    f"{'a number' if key in ('open', 'close') else 'a whole number'}, got {value}"
                ) from None
        out[name] = dataclasses.replace(default, **changes).check(name)  # type: ignore[arg-type]
    return out
