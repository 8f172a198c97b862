"""The frame-timing (latency) panel and the engine panel.

They take small view objects (plain numbers, already in ms / bytes) so that they do not depend on
how the session names its telemetry; `tui.app` maps the session's snapshot onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from textual.app import ComposeResult
from textual.containers import Vertical

from . import format as fmt
from .lines import LineBuilder, LineWidget
from .meters import EIGHTHS, Lane, _Runs

BUDGET_MS = 80.0
STAGE_LABELS = (("encode", "enc"), ("temporal", "temp"), ("depth", "depf"), ("decode", "dec"),
                ("total", "total"))


@dataclass(frozen=True)
class StageView:
    last: float | None = None
    p50: float | None = None
    p95: float | None = None
    max: float | None = None
    over: int | None = None  # frames over the budget (total only)


@dataclass(frozen=True)
class LatencyView:
    stages: Mapping[str, StageView] = field(default_factory=dict)
    window_note: str = "last 10 s"
    detailed: bool = True  # False: only the total is measured every frame
    timing_note: str = ""  # how the stage split is measured (detailed / sampled), shown last
    mouth_to_ear_p50: float | None = None
    mouth_to_ear_p95: float | None = None
    frames: int = 0


@dataclass(frozen=True)
class EngineView:
    rtf_p50: float | None = None
    rtf_p95: float | None = None
    frames_per_s: float | None = None
    text_tok_s: float | None = None  # non-pad pieces per second
    all_tok_s: float | None = None
    context_used: int | None = None
    context_size: int | None = None
    prefill_s: float | None = None
    mlx_active: int | None = None
    mlx_peak: int | None = None
    mlx_cache: int | None = None
    rss: int | None = None
    pressure: str | None = None  # "normal" / "warn" / "critical" / None (not available)
    swap: int | None = None
    counters: Mapping[str, float] = field(default_factory=dict)


class StageBars(LineWidget):
    """Per-stage bars against the 80 ms budget with last / p50 / p95, plus the total's max/over."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "stage--label", "stage--ok", "stage--warn", "stage--over", "stage--budget",
        "stage--track", "stage--num", "stage--dim",
    }
    DEFAULT_CSS = """
    StageBars { height: auto; width: 1fr; text-wrap: nowrap; text-overflow: clip; }
    StageBars > .stage--label { text-style: bold; }
    StageBars > .stage--ok { color: $meter-low; }
    StageBars > .stage--warn { color: $meter-mid; }
    StageBars > .stage--over { color: $meter-high; }
    StageBars > .stage--budget { color: $meter-high; }
    StageBars > .stage--track { color: $meter-track; }
    StageBars > .stage--num { color: $foreground; }
    StageBars > .stage--dim { color: $text-muted; }
    """

    def __init__(self, *, budget_ms: float = BUDGET_MS, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.budget_ms = budget_ms
        self.view = LatencyView()
        self._shown: tuple | None = None

    def set_view(self, view: LatencyView) -> None:
        grows = bool(view.timing_note) != bool(self.view.timing_note)
        self.view = view
        if view != self._shown:
            self._shown = view
            self.invalidate()
            if grows:  # the note line came or went: the panel's height changes
                self.refresh(layout=True)

    def line_count(self) -> int:
        return len(STAGE_LABELS) + 3 + (1 if self.view.timing_note else 0)

    def build(self, width: int):
        view = self.view
        num_w = 21
        cells = max(6, width - 7 - num_w)
        scale = self.budget_ms * 1.25
        budget_cell = min(cells - 1, int(self.budget_ms / scale * cells))
        out = LineBuilder()
        head = f"0{'':{budget_cell - 1}}{self.budget_ms:.0f}"[:cells].ljust(cells)
        out.append(" " * 7 + head, "stage--dim")
        out.append(f"{'last':>7}{'p50':>7}{'p95':>7}\n", "stage--dim")
        for key, label in STAGE_LABELS:
            st = view.stages.get(key)
            out.append(f"{label:<6} ", "stage--label")
            if key != "total" and not view.detailed and (st is None or st.last is None):
                out.append("per-stage timing off (t)", "stage--dim")
                out.append("\n")
                continue
            st = st or StageView()
            value = st.last if st.last is not None else st.p50
            eighths = 0 if value is None else int(round(min(1.0, value / scale) * cells * 8))
            full, part = divmod(eighths, 8)
            if value is None:
                cls = "stage--track"
            elif value > self.budget_ms:
                cls = "stage--over"
            elif value > 0.8 * self.budget_ms:
                cls = "stage--warn"
            else:
                cls = "stage--ok"
            runs = _Runs(out.append)
            for i in range(cells):
                if i < full:
                    runs.add("█", cls)
                elif i == full and part:
                    runs.add(EIGHTHS[part], cls)
                elif i == budget_cell:
                    runs.add("┊", "stage--budget")
                else:
                    runs.add("·" if key == "total" else " ", "stage--track")
            runs.flush()
            out.append(f"{fmt.num(value, 1, width=7)}", "stage--num")
            out.append(f"{fmt.num(st.p50, 1, width=7)}", "stage--num")
            out.append(f"{fmt.num(st.p95, 1, width=7)}", "stage--num")
            out.append("\n")
        total = view.stages.get("total") or StageView()
        over = total.over or 0
        out.append("max ", "stage--dim")
        out.append(fmt.ms(total.max), "stage--num")
        out.append(" · ", "stage--dim")
        out.append(f"{over} frames over budget", "stage--over" if over else "stage--num")
        out.append("\nmouth→ear ", "stage--dim")
        if view.mouth_to_ear_p50 is None:
            out.append("–", "stage--num")
        else:
            out.append(f"p50 {fmt.ms(view.mouth_to_ear_p50)}  p95 "
                       f"{fmt.ms(view.mouth_to_ear_p95)}", "stage--num")
        if view.timing_note:
            out.append("\n" + view.timing_note,
                       "stage--warn" if view.timing_note.startswith("detailed") else "stage--dim")
        return out.lines


class LatencyPanel(Vertical):
    """Frame timing: the stage bars and a history lane of the total step time."""

    DEFAULT_CSS = """
    LatencyPanel { height: auto; }
    LatencyPanel > Lane > .lane--bar { color: $accent; }
    """

    def __init__(self, *, budget_ms: float = BUDGET_MS, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.budget_ms = budget_ms

    def compose(self) -> ComposeResult:
        yield StageBars(budget_ms=self.budget_ms, id="stages")
        yield Lane("step", window_s=20.0, note="(20 s, top = 100 ms)", id="step-lane")

    def set_view(self, view: LatencyView) -> None:
        self.query_one(StageBars).set_view(view)

    def push_history(self, t: float, total_ms: float | None) -> None:
        if total_ms is not None and math.isfinite(total_ms):
            self.query_one(Lane).push(t, total_ms / (self.budget_ms * 1.25))

    def update_graphs(self) -> None:
        self.query_one(Lane).update_display()

    def clear_history(self) -> None:
        self.query_one(Lane).clear()


class EngineStats(LineWidget):
    """Engine numbers: real-time factor, rates, context, memory, audio counters."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "engine--label", "engine--num", "engine--dim", "engine--ok", "engine--warn", "engine--bad",
    }
    DEFAULT_CSS = """
    EngineStats { height: auto; width: 1fr; text-wrap: nowrap; text-overflow: clip; }
    EngineStats > .engine--label { color: $text-muted; }
    EngineStats > .engine--num { color: $foreground; text-style: bold; }
    EngineStats > .engine--dim { color: $text-muted; }
    EngineStats > .engine--ok { color: $meter-low; text-style: bold; }
    EngineStats > .engine--warn { color: $meter-mid; text-style: bold; }
    EngineStats > .engine--bad { color: $meter-high; text-style: bold; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.view = EngineView()
        self._shown: tuple | None = None

    def set_view(self, view: EngineView) -> None:
        self.view = view
        if view != self._shown:
            self._shown = view
            self.invalidate()

    def line_count(self) -> int:
        return 6

    def build(self, width: int):
        v = self.view
        out = LineBuilder()

        def pair(label: str, value: str, cls: str = "engine--num") -> None:
            out.append(label + " ", "engine--label")
            out.append(value, cls)
            out.append("  ")

        rtf_cls = "engine--num"
        if v.rtf_p95 is not None:
            rtf_cls = ("engine--ok" if v.rtf_p95 < 0.8 else
                       "engine--warn" if v.rtf_p95 <= 1.0 else "engine--bad")
        pair("RTF", fmt.num(v.rtf_p50, 2), rtf_cls)
        out.append(f"(p95 {fmt.num(v.rtf_p95, 2)})  ", "engine--dim")
        pair("frames/s", fmt.num(v.frames_per_s, 1))
        out.append("\n")
        pair("text", f"{fmt.num(v.text_tok_s, 1)} tok/s")
        out.append(f"(all {fmt.num(v.all_tok_s, 1)})  ", "engine--dim")
        if v.prefill_s is not None:
            pair("prefill", fmt.ms(v.prefill_s * 1000.0))
        out.append("\n")
        if v.context_used is not None and v.context_size:
            ctx_cls = "engine--warn" if v.context_used >= 0.9 * v.context_size else "engine--num"
            pair("context", f"{fmt.count(v.context_used)} / {fmt.count(v.context_size)} frames",
                 ctx_cls)
        elif v.context_used is not None:
            pair("context", f"{fmt.count(v.context_used)} frames since the prompt")
        else:
            pair("context", "–")
        out.append("\n")
        pair("MLX active", fmt.gb(v.mlx_active))
        pair("peak", fmt.gb(v.mlx_peak))
        pair("cache", fmt.gb(v.mlx_cache))
        out.append("\n")
        pair("RSS", fmt.gb(v.rss))
        if v.pressure is None:
            pair("pressure", "n/a", "engine--dim")
        else:
            cls = {"normal": "engine--ok", "warn": "engine--warn"}.get(v.pressure, "engine--bad")
            pair("pressure", f"● {v.pressure}", cls)
        if v.swap is not None:
            pair("swap", fmt.gb(v.swap))
        out.append("\n")
        c = v.counters
        if c:
            parts = []
            for key, label, unit in (("in_drops", "in-drop", ""), ("starved", "starved", ""),
                                     ("starved_ms", "", " ms"), ("trimmed_ms", "trimmed", " ms"),
                                     ("pa_flags", "PA flags", "")):
                if key in c:
                    val = c[key]
                    txt = f"{val:.0f}{unit}"
                    parts.append((label, txt, bool(val)))
            for label, txt, bad in parts:
                if label:
                    out.append(label + " ", "engine--label")
                out.append(txt + "  ", "engine--warn" if bad else "engine--num")
        else:
            out.append("audio counters –", "engine--dim")
        return out.lines


class EnginePanel(Vertical):
    DEFAULT_CSS = """
    EnginePanel { height: auto; }
    """

    def compose(self) -> ComposeResult:
        yield EngineStats(id="engine-stats")

    def set_view(self, view: EngineView) -> None:
        self.query_one(EngineStats).set_view(view)
