"""Number formatting for the dashboard: every number carries its unit (TUI.md §1, §4)."""

from __future__ import annotations

import math

NBSP_GROUP = "\u202f"  # narrow no-break space between thousands groups: "9 512"


def ms(value: float | None, *, digits: int | None = None) -> str:
    """Milliseconds below one second ("64 ms", "2.1 ms"), seconds with two decimals above."""
    if value is None or not math.isfinite(value):
        return "– ms"
    if value >= 1000.0:
        return f"{value / 1000.0:.2f} s"
    if digits is None:
        digits = 1 if value < 10.0 else 0
    return f"{value:.{digits}f} ms"


def num(value: float | None, digits: int = 1, *, width: int = 0) -> str:
    """A plain number with `digits` decimals, '–' when unknown."""
    if value is None or not math.isfinite(value):
        return "–".rjust(width)
    return f"{value:.{digits}f}".rjust(width)


def count(value: int | None) -> str:
    """An integer with thin-space thousands groups: 9 512."""
    if value is None:
        return "–"
    return f"{int(value):,}".replace(",", NBSP_GROUP)


def gb(value: int | float | None) -> str:
    """Bytes as GB with one decimal ("9.4 GB"); MB below 1 GB, so small models show something."""
    if value is None:
        return "– GB"
    if value < 1024**3:
        return f"{value / 1024**2:.0f} MB"
    return f"{value / 1024**3:.1f} GB"


def db(value: float | None, floor: float = -60.0) -> str:
    """dBFS as a whole number, or '-inf' below the meter floor."""
    if value is None or not math.isfinite(value) or value <= floor - 30:
        return "-inf"
    return f"{value:.0f}"


def clock(seconds: float | None) -> str:
    """Elapsed time as HH:MM:SS."""
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def mmss(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}"
