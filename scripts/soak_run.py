#!/usr/bin/env python3
"""Soak test of the live session (issue 6): the tiny model at real-time pace for 30 minutes.

    python scripts/soak_run.py                      # 30 min, tests/fixtures/personaplex-tiny
    python scripts/soak_run.py --minutes 2 --json soak.json
    python scripts/soak_run.py --devices            # through the sound devices instead of a file

The user's side is the fixture's input.wav, looped, fed through the file backend at wall-clock pace
(the same live session `parley run --input` uses); `--devices` uses the sound devices (e.g. the
PulseAudio null sinks of scripts/ci_audio_setup.sh). With `--exercise` the controls are poked
every 30 s (interrupt, mute on/off, a persona reset), so their paths soak too.

Every `--sample-s` seconds it records process RSS, MLX active/peak/cache memory, frames processed
and the audio counters; at the end it prints a table and a summary:
* memory: the mean RSS / MLX active memory of the first stretch after warm-up vs the last stretch,
  and a least-squares slope (MB per 10 min) — "flat" when the growth is under --max-growth-mb;
* frames: model steps run (30 min = 22 500 at 12.5 frames/s), drops, starvation, latency, RTF.
Exit status 0 when memory is flat and the run kept real time, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "personaplex-tiny"))
    ap.add_argument("--input", default=None, help="user-side audio (default: the model dir's input.wav)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="ignored for the memory comparison")
    ap.add_argument("--max-growth-mb", type=float, default=25.0)
    ap.add_argument("--devices", action="store_true", help="use the sound devices, not a file")
    ap.add_argument("--exercise", action="store_true", help="poke the controls every 30 s")
    ap.add_argument("--json", default=None, help="write samples and summary here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from engine.audio.backends import FileBackend, SoundDeviceBackend
    from engine.session import Session, SessionConfig
    from engine.session.telemetry import format_status_line

    model_dir = Path(args.model)
    duration = args.minutes * 60.0
    voice = model_dir / "voices" / "TINY0.pt"

    def factory():
        from engine.duplex import DuplexEngine

        return DuplexEngine.load(str(model_dir), dtype="float32" if "tiny" in model_dir.name else None, greedy=True)

    from engine.personas import TEACHER_PROMPT, Persona

    persona = Persona(name="SoakTeacher", prompt=TEACHER_PROMPT, voice=str(voice) if voice.exists() else "NATF2")
    if args.devices:
        backend = SoundDeviceBackend()
        cfg = SessionConfig(echo_mode="aec")
    else:
        backend = FileBackend(args.input or (model_dir / "input.wav"), None, realtime=True, loop=True, duration_s=duration)
        cfg = SessionConfig()
    session = Session(factory, backend, persona=persona, config=cfg)
    samples = []
    t0 = time.monotonic()
    session.start()
    if not session.wait_ready(120):
        print("the session did not become ready:", session.snapshot.message, file=sys.stderr)
        session.stop()
        return 1
    stop = threading.Event()
    next_poke = 30.0
    poke = 0
    try:
        next_sample = 0.0
        while True:
            el = time.monotonic() - t0
            if el >= duration + (1.0 if not args.devices else 0.0) or backend.state.value in ("finished", "error"):
                break
            if el >= next_sample:
                s = session.snapshot
                c = s.counters
                samples.append(
                    dict(
                        t=round(el, 1),
                        frames=s.frame_index,
                        rss_mb=s.memory.rss_mb,
                        mlx_active_mb=s.memory.mlx_active_mb,
                        mlx_peak_mb=s.memory.mlx_peak_mb,
                        mlx_cache_mb=s.memory.mlx_cache_mb,
                        step_p50=s.timings["total"].p50 if "total" in s.timings else None,
                        step_p95=s.timings["total"].p95 if "total" in s.timings else None,
                        latency_p50=s.latency.p50_ms,
                        drops=c.get("catchup_drop_frames", 0),
                        starved=c.get("out_starved_callbacks", 0),
                        state=s.state.value,
                    )
                )
                if not args.quiet:
                    print(format_status_line(s), f"| RSS {s.memory.rss_mb} MB MLX {s.memory.mlx_active_mb} MB", flush=True)
                next_sample += args.sample_s
            if args.exercise and el >= next_poke:
                next_poke += 30.0
                poke += 1
                k = poke % 4
                if k == 1:
                    session.interrupt()
                elif k == 2:
                    session.set_mic_muted(True)
                    time.sleep(1.0)
                    session.set_mic_muted(False)
                elif k == 3:
                    session.reset_conversation()
                else:
                    session.set_speaker_muted(True)
                    time.sleep(1.0)
                    session.set_speaker_muted(False)
            if stop.wait(0.25):
                break
    except KeyboardInterrupt:
        pass
    final = session.stop()
    wall = time.monotonic() - t0
    summary = summarize(samples, final, wall, args)
    print_table(samples)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary=summary, samples=samples), indent=1))
    return 0 if summary["memory_flat"] and summary["kept_real_time"] else 1


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _slope_per_10min(samples, key, after):
    pts = [(s["t"], s[key]) for s in samples if s["t"] >= after and s[key] is not None]
    if len(pts) < 3:
        return None
    t = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(t, y, 1)[0] * 600.0)


def summarize(samples, final, wall, args) -> dict:
    after = min(args.warmup_s, max(0.0, wall / 4))
    live = [s for s in samples if s["t"] >= after]
    n = max(1, len(live) // 5)
    first, last = live[:n], live[-n:]
    rss0, rss1 = _mean([s["rss_mb"] for s in first]), _mean([s["rss_mb"] for s in last])
    mlx0, mlx1 = _mean([s["mlx_active_mb"] for s in first]), _mean([s["mlx_active_mb"] for s in last])
    growth = (rss1 - rss0) if rss0 is not None and rss1 is not None else None
    mlx_growth = (mlx1 - mlx0) if mlx0 is not None and mlx1 is not None else 0.0
    c = dict(final.counters)
    t = final.timings.get("total")
    expected = wall * 12.5
    return dict(
        wall_s=round(wall, 1),
        frames=final.frame_index,
        frames_expected=round(expected),
        frames_in=c.get("frames_in"),
        rss_first_mb=round(rss0, 1) if rss0 is not None else None,
        rss_last_mb=round(rss1, 1) if rss1 is not None else None,
        rss_growth_mb=round(growth, 1) if growth is not None else None,
        rss_slope_mb_per_10min=_round(_slope_per_10min(samples, "rss_mb", after)),
        rss_peak_mb=final.memory.rss_peak_mb,
        mlx_active_first_mb=_round(mlx0),
        mlx_active_last_mb=_round(mlx1),
        mlx_active_growth_mb=_round(mlx_growth),
        mlx_peak_mb=final.memory.mlx_peak_mb,
        mlx_cache_mb=final.memory.mlx_cache_mb,
        step_p50_ms=t.p50 if t else None,
        step_p95_ms=t.p95 if t else None,
        step_max_ms=t.session_max if t else None,
        over_budget_frames=t.over_budget if t else None,
        latency_p50_ms=final.latency.p50_ms,
        latency_p95_ms=final.latency.p95_ms,
        catchup_drop_frames=c.get("catchup_drop_frames"),
        out_starved_callbacks=c.get("out_starved_callbacks"),
        out_starved_ms=c.get("out_starved_ms"),
        out_trimmed_ms=c.get("out_trimmed_ms"),
        out_pad_ms=c.get("out_pad_ms"),
        watchdog_fires=c.get("watchdog_fires"),
        events_dropped=c.get("events_dropped"),
        text_tokens=c.get("text_tokens"),
        memory_flat=growth is not None and growth < args.max_growth_mb and mlx_growth < args.max_growth_mb,
        kept_real_time=final.frame_index >= 0.95 * expected * (1 - 0.0) - 50,
    )


def _round(v):
    return None if v is None else round(v, 1)


def print_table(samples) -> None:
    print(f"{'t(s)':>7} {'frames':>7} {'RSS MB':>8} {'MLX act':>8} {'MLX peak':>8} {'cache':>7} {'step p50':>8} {'m2e p50':>8} {'drops':>6} {'starved':>7}")
    for s in samples:
        def f(v, w, d=1):
            return f"{v:>{w}.{d}f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>{w}}"

        print(f"{s['t']:>7.0f} {s['frames']:>7d} {f(s['rss_mb'], 8)} {f(s['mlx_active_mb'], 8)} {f(s['mlx_peak_mb'], 8)} "
              f"{f(s['mlx_cache_mb'], 7)} {f(s['step_p50'], 8)} {f(s['latency_p50'], 8)} {s['drops']:>6} {s['starved']:>7}")


if __name__ == "__main__":
    sys.exit(main())
