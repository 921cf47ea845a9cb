"""One type for every scheduled number: learning rate, temperature, loss weights, mask ratio...

A plain number is a constant. A mapping ``{kind, start, end, steps, warmup}`` describes a curve:

- ``warmup`` steps rise linearly from 0 to ``start`` (step 0 gives ``start / warmup``);
- then the curve goes from ``start`` to ``end``, reaching ``end`` at step ``steps`` (counted from
  step 0, warmup included) and staying there.

``kind`` is one of ``constant``, ``linear``, ``cosine`` (half-cosine anneal), ``exponential``
(geometric interpolation, ``start`` and ``end`` > 0) and ``noam`` (Vaswani et al. 2017:
``start * min(1, sqrt(warmup / step))`` after the warmup, floored at ``end``).
``steps: null`` means "the run's ``trainer.max_steps``"; the trainer fills it in with
:meth:`Schedule.resolve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "noam")


class ScheduleError(ValueError):
    """A schedule description that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    start: float = 0.0
    end: float | None = None  # None: same as start
    steps: int | None = None  # None: the run's max_steps
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ScheduleError(
                f"schedule kind must be one of {', '.join(SCHEDULE_KINDS)}; got {self.kind!r}"
            )
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ScheduleError(f"schedule {name} must be a finite number; got {value}")
        if self.warmup < 0:
            raise ScheduleError(f"schedule warmup must be >= 0; got {self.warmup}")
        if self.steps is not None and self.steps < 0:
            raise ScheduleError(f"schedule steps must be >= 0; got {self.steps}")
        if self.kind == "exponential" and (self.start <= 0 or self.end_value <= 0):
            raise ScheduleError(
                f"an exponential schedule needs start and end > 0; got start={self.start}, "
                f"end={self.end_value}"
            )

    @property
    def end_value(self) -> float:
        return self.start if self.end is None else self.end

    @classmethod
    def parse(cls, value: Any) -> Schedule:
        """Build a schedule from a number, a mapping, or another Schedule."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, bool):
            raise ScheduleError(f"a schedule is a number or a mapping; got the boolean {value}")
        if isinstance(value, int | float):
            return cls(kind="constant", start=float(value))
        if isinstance(value, dict):
            unknown = set(value) - {"kind", "start", "end", "steps", "warmup"}
            if unknown:
                raise ScheduleError(
                    f"unknown schedule field(s) {', '.join(sorted(unknown))}; allowed: "
                    "kind, start, end, steps, warmup"
                )
            fields: dict[str, Any] = dict(value)
            for name in ("start", "end"):
                if fields.get(name) is not None:
                    fields[name] = _number(name, fields[name], float)
            for name in ("steps", "warmup"):
                if fields.get(name) is not None:
                    fields[name] = _number(name, fields[name], int)
            return cls(**fields)
        raise ScheduleError(f"a schedule is a number or a mapping; got {value!r}")

    def resolve(self, max_steps: int) -> Schedule:
        """Fill in ``steps`` with the run's length when it was left open."""
        return self if self.steps is not None else replace(self, steps=max_steps)

    def to_config(self) -> float | dict[str, Any]:
        """The plain form written to config.yaml: a number for a constant, else a mapping."""
        if self.kind == "constant" and self.warmup == 0:
            return self.start
        return {
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "warmup": self.warmup,
        }

    def __call__(self, step: int) -> float:
        start, end = self.start, self.end_value
        if self.warmup > 0 and step < self.warmup:
            return start * (step + 1) / self.warmup
        if self.kind == "constant":
            return start
        if self.kind == "noam":
            decayed = start * math.sqrt(max(self.warmup, 1) / max(step + 1, 1))
            return max(min(start, decayed), end) if self.end is not None else min(start, decayed)
        total = self.steps if self.steps is not None else 0
        span = total - self.warmup
        progress = 1.0 if span <= 0 else min(max((step - self.warmup) / span, 0.0), 1.0)
        if self.kind == "linear":
            return start + (end - start) * progress
        if self.kind == "cosine":
            return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # exponential: geometric interpolation between start and end
        return start * (end / start) ** progress


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScheduleError(f"schedule field {name!r} must be a number; got {value!r}")
    if kind is int and float(value) != int(value):
        raise ScheduleError(f"schedule field {name!r} must be a whole number; got {value!r}")
    return kind(value)
