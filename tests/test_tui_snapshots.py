"""Deterministic SVG snapshots of the dashboard's main screen at 120x40 and 80x24.

The app runs without timers, session or wall clock: a fixed series of hand-built telemetry
`Snapshot`s and `SessionEvent`s is drawn through `ParleyApp.show_snapshot` (the same code path the
timers use) with frozen clocks, in UTC. The baselines live in tests/snapshots/; after an intended
change, regenerate them with `PARLEY_UPDATE_SNAPSHOTS=1 pytest tests/test_tui_snapshots.py` and
look at the new SVGs before committing them. A mismatch writes the new SVG next to the baseline
as `*.new.svg`.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from engine.audio.meters import LevelReading
from engine.personas import Persona
from engine.session.telemetry import (AudioInfo, LatencyStats, MemoryStats, SessionEvent,
                                      SessionState, Snapshot, StageStats)
from tui.app import ParleyApp

SNAPSHOTS = Path(__file__).parent / "snapshots"
WALL0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
PERSONAS = [
    Persona(name="Teacher", prompt="You are a wise and friendly teacher.", voice="NATF2"),
    Persona(name="Casual", prompt="You enjoy having a good conversation.", voice="NATM0"),
]


def _reading(rms: float, peak: float, hold: float) -> LevelReading:
    return LevelReading(rms_dbfs=rms, peak_dbfs=peak, hold_dbfs=hold, block_rms_dbfs=rms)


def fixed_snapshot(i: int, n: int) -> Snapshot:
    """Frame-like telemetry at step i of n (0.25 s apart): speech-like levels, VAD, timings."""
    t = i * 0.25
    user = 4 <= i < 14 or 30 <= i < 36
    model = 10 <= i < 28 or i >= 34
    mic = -24.0 + 6 * math.sin(i * 0.9) if user else -58.0
    spk = -20.0 + 5 * math.cos(i * 0.7) if model else -70.0
    timings = MappingProxyType({
        "encode": StageStats(last=2.1, p50=2.0, p95=2.6, max=3.0, count=125),
        "temporal": StageStats(last=51.2, p50=50.8, p95=53.9, max=58.0, count=125),
        "depth": StageStats(last=9.7, p50=9.5, p95=10.8, max=12.0, count=125),
        "decode": StageStats(last=1.9, p50=1.8, p95=2.3, max=2.9, count=125),
        "total": StageStats(last=60.0 + 8 * math.sin(i), p50=64.1, p95=71.0, max=82.4,
                            over_budget=2, count=125),
    })
    return Snapshot(
        seq=i + 1, time=t, uptime_s=761.0 + t, state=SessionState.SPEAKING,
        activity="SPEAKING", overlap=user and model, persona="Teacher",
        frame_index=9512 + int(t * 12.5), frames_since_prompt=1204 + int(t * 12.5),
        context_frames=3000, last_prompt_s=0.412,
        mic=_reading(mic, mic + 9, -11.0), mic_clean=_reading(mic - 7, mic, -18.0),
        speaker=_reading(spk, spk + 8, -9.0), model_out=_reading(spk, spk + 8, -9.0),
        vad=user, vad_probability=0.9 if user else 0.0, aec_reduction_db=41.0,
        timings=timings, rtf_p50=0.81, rtf_p95=0.89, frames_per_s=12.5,
        text_tokens_per_s=3.1, all_tokens_per_s=12.5,
        latency=LatencyStats(last_ms=185.0, p50_ms=182.0, p95_ms=205.0, max_ms=230.0, count=125),
        memory=MemoryStats(mlx_active_mb=9625.6, mlx_peak_mb=10342.4, mlx_cache_mb=614.4,
                           rss_mb=11059.2, pressure="normal"),
        counters=MappingProxyType({"catchup_dropped_ms": 0.0, "out_starved_callbacks": 0,
                                   "out_starved_ms": 0.0, "out_trimmed_ms": 0.0}),
        audio=AudioInfo(backend="sounddevice", state="running", input_device="MacBook Pro Microphone",
                        output_device="MacBook Pro Speakers", input_rate=24000,
                        output_rate=48000, echo_mode="aec", echo_description="AEC on"),
    )


TEXT = [(10, "Sure!"), (11, " The moon"), (12, " changes shape"), (13, " because we see"),
        (14, " different parts"), (15, " of it lit"), (16, " by the sun."),
        (34, " It's about"), (35, " three hundred"), (36, " eighty thousand")]


def events_at(i: int) -> list[SessionEvent]:
    return [SessionEvent("text", WALL0 + k * 0.25, 9512 + k * 3, MappingProxyType({"piece": p}))
            for k, p in TEXT if k == i]


async def _render(size: tuple[int, int]) -> str:
    now = {"mono": 0.0, "wall": WALL0}
    app = ParleyApp(personas=PERSONAS, persona="Teacher", model_label="PersonaPlex-7B q8",
                    timers=False, tty_check=False, clock=lambda: now["wall"],
                    monotonic=lambda: now["mono"])
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        n = 40
        for i in range(n):
            now["mono"] = i * 0.25
            now["wall"] = WALL0 + i * 0.25
            app.show_snapshot(fixed_snapshot(i, n), events_at(i))
        await pilot.pause()
        return app.export_screenshot(title="Parley")


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_main_screen_snapshot(size, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        svg = asyncio.run(_render(size))
        svg_again = asyncio.run(_render(size))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert svg == svg_again, "the screenshot is not deterministic"
    name = f"main_{size[0]}x{size[1]}.svg"
    baseline = SNAPSHOTS / name
    if os.environ.get("PARLEY_UPDATE_SNAPSHOTS") or not baseline.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        baseline.write_text(svg, encoding="utf-8")
        if not os.environ.get("PARLEY_UPDATE_SNAPSHOTS"):
            pytest.fail(f"wrote the missing baseline {baseline}; check it and commit it")
        return
    expected = baseline.read_text(encoding="utf-8")
    if svg != expected:
        new = baseline.with_suffix(".new.svg")
        new.write_text(svg, encoding="utf-8")
        pytest.fail(f"{name} differs from the baseline; see {new} (PARLEY_UPDATE_SNAPSHOTS=1 "
                    "accepts it)")
    # the fixed data is visible: state, persona, model, numbers with units, the text
    for word in ("SPEAKING", "Teacher", "PersonaPlex-7B q8", "dBFS", "moon"):
        assert word in svg.replace("&#160;", " "), word
