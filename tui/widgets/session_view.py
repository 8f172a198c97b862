"""The one place that knows the session's API: controls, the telemetry snapshot and its events.

`SessionLink` wraps an `engine.session.Session`: its controls are non-blocking (they queue a
command for the engine thread), `session.snapshot` is an immutable `Snapshot` swapped in
atomically, and `session.events` is a bounded `EventStream` drained here at the text rate.
`build_views` turns one snapshot into the plain view objects the widgets draw, so the widgets do
not depend on the telemetry's field names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .audio import AudioView, DeviceView, LevelView
from .panels import EngineView, LatencyView, StageView
from .status import StatusView

MB = 1024 * 1024
STAGES = ("encode", "temporal", "depth", "decode", "total")
GLITCH_COUNTERS = ("in_ring_full_drops", "catchup_drop_frames", "out_starved_callbacks",
                   "out_ring_full_drops", "input_overflow", "input_underflow", "output_underflow",
                   "output_overflow", "watchdog_fires")
PA_FLAGS = ("input_underflow", "input_overflow", "output_underflow", "output_overflow",
            "priming_output")
LIVE_STATES = {"LISTENING", "SPEAKING", "MUTED"}


@dataclass(frozen=True)
class Views:
    status: StatusView
    audio: AudioView
    latency: LatencyView
    engine: EngineView
    devices: DeviceView
    silent_mic: bool
    persona_name: str | None
    message: str
    model_db: float


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def _level(reading: Any) -> LevelView:
    return LevelView(float(reading.rms_dbfs), float(reading.peak_dbfs), float(reading.hold_dbfs),
                     bool(reading.clipped))


def _mb(value: float | None) -> int | None:
    return None if value is None else int(value * MB)


class SessionLink:
    """Access to a running session for the UI thread: nothing here blocks."""

    def __init__(self, session: Any, *, persona_resolver=None):
        self.session = session
        self.persona_resolver = persona_resolver

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> Any:
        return self.session.snapshot

    def drain_events(self, max_items: int = 1000) -> list[Any]:
        return self.session.events.drain(max_items)

    def model(self) -> Any:
        """The session's model, or None while its model thread is still loading it."""
        return getattr(self.session, "model", None)

    # -- controls ------------------------------------------------------------------------------

    def mic_muted(self) -> bool:
        return bool(self.session.mic_muted)

    def speaker_muted(self) -> bool:
        return bool(self.session.speaker_muted)

    def paused(self) -> bool:
        return bool(self.session.paused)

    def set_mic_muted(self, muted: bool) -> None:
        self.session.set_mic_muted(muted)

    def set_speaker_muted(self, muted: bool) -> None:
        self.session.set_speaker_muted(muted)

    def set_paused(self, paused: bool) -> None:
        self.session.set_paused(paused)

    def interrupt(self) -> None:
        self.session.interrupt()

    def persona(self) -> Any:
        """The persona the session runs (or is switching to)."""
        return getattr(self.session, "persona", None)

    def resolve(self, persona: Any) -> Any:
        """The persona as the session runs it (a voice the model lacks replaced by the resolver)."""
        return self.persona_resolver(persona) if self.persona_resolver is not None else persona

    def switch_persona(self, persona: Any) -> None:
        persona = self.resolve(persona)
        self.session.switch_persona(persona, name=getattr(persona, "name", None))

    def voices(self) -> list[str] | None:
        """The voice names the loaded model offers; None while the model is still loading, [] for a
        model that cannot say."""
        model = self.model()
        if model is None:
            return None
        fn = getattr(model, "available_voices", None)
        if fn is None:
            return []
        try:
            return [str(v) for v in fn()]
        except Exception:  # an unreadable voice folder: no voices to offer
            return []

    def detailed_timing(self) -> bool:
        """Whether detailed per-stage timing (barriers on every frame) is switched on."""
        return bool(getattr(self.session, "detailed_timing", False))

    def set_detailed_timing(self, on: bool) -> None:
        fn = getattr(self.session, "set_detailed_timing", None)
        if fn is not None:
            fn(bool(on))

    def detailed_timing_supported(self) -> bool | None:
        """Whether the model has the switch (None while it is loading)."""
        model = self.model()
        return None if model is None else hasattr(model, "profile_stages")

    def reset(self) -> None:
        self.session.reset_conversation()

    def cycle_echo_mode(self) -> str | None:
        fn = getattr(self.session, "cycle_echo_mode", None)
        if fn is None:
            return None
        mode = fn()
        return str(getattr(mode, "value", mode))

    def reset_stats(self) -> None:
        self.session.reset_stats()

    def record_dir(self) -> str | None:
        d = getattr(self.session, "record_dir", None)
        return None if d is None else str(d)

    def close(self) -> None:
        self.session.stop()


def build_views(snap: Any, *, model_label: str = "", voices: Mapping[str, str] | None = None,
                persona_hint: str | None = None) -> Views:
    """Maps an `engine.session.telemetry.Snapshot` onto the widgets' view objects."""
    state = _value(snap.state)
    counters = snap.counters or {}
    word = snap.activity if state in LIVE_STATES else state
    secondary = "you too" if (snap.overlap and word == "SPEAKING" and not snap.mic_muted) else None
    badges: list[str] = []
    if snap.mic_muted:
        badges.append("MUTED")
    if snap.speaker_muted:
        badges.append("DEAFENED")
    if snap.paused and word != "PAUSED":
        badges.append("PAUSED")
    if snap.behind:
        dropped = counters.get("catchup_dropped_ms", 0.0)
        badges.append(f"BEHIND {dropped:.0f} ms" if dropped else "BEHIND")
    if snap.mic_silent:
        badges.append("SILENT MIC")
    if snap.glitch:
        badges.append("GLITCH")
    total = (snap.timings or {}).get("total")
    persona = snap.persona or persona_hint
    glitches = int(sum(counters.get(name, 0) for name in GLITCH_COUNTERS))
    status = StatusView(
        state=word, secondary=secondary, badges=tuple(badges), model=model_label,
        voice=(voices or {}).get(persona or ""), persona=persona, uptime_s=snap.uptime_s,
        frame=snap.frame_index,
        step_p50=total.p50 if total is not None and total.count else None,
        step_p95=total.p95 if total is not None and total.count else None,
        rtf=snap.rtf_p50 if total is not None and total.count else None,
        dropped_ms=float(counters.get("catchup_dropped_ms", 0.0)), glitches=glitches,
        live=state in LIVE_STATES or state == "PROMPTING",
    )

    echo_mode = snap.audio.echo_mode
    audio = AudioView(
        mic=_level(snap.mic),
        spk=_level(snap.speaker),
        clean=_level(snap.mic_clean) if echo_mode == "aec" else None,
        vad=bool(snap.vad), mic_muted=bool(snap.mic_muted), spk_muted=bool(snap.speaker_muted),
    )

    stages = {}
    for name in STAGES:
        st = (snap.timings or {}).get(name)
        if st is None or not st.count:
            continue
        stages[name] = StageView(st.last, st.p50, st.p95, st.max, st.over_budget)
    detailed = any(name in stages and stages[name].last for name in STAGES[:-1])
    latency = LatencyView(stages=stages, detailed=detailed, timing_note=timing_note(snap),
                          mouth_to_ear_p50=snap.latency.p50_ms,
                          mouth_to_ear_p95=snap.latency.p95_ms, frames=snap.frame_index)

    mem = snap.memory
    pa_flags = sum(counters.get(name, 0) for name in PA_FLAGS)
    engine = EngineView(
        rtf_p50=snap.rtf_p50 if stages else None, rtf_p95=snap.rtf_p95 if stages else None,
        frames_per_s=snap.frames_per_s, text_tok_s=snap.text_tokens_per_s,
        all_tok_s=snap.all_tokens_per_s, context_used=snap.frames_since_prompt,
        context_size=snap.context_frames, prefill_s=snap.last_prompt_s,
        mlx_active=_mb(mem.mlx_active_mb), mlx_peak=_mb(mem.mlx_peak_mb),
        mlx_cache=_mb(mem.mlx_cache_mb), rss=_mb(mem.rss_mb), pressure=mem.pressure,
        counters={
            "in_drops": counters.get("catchup_drop_frames", 0)
            + counters.get("in_ring_full_drops", 0),
            "starved": counters.get("out_starved_callbacks", 0),
            "starved_ms": counters.get("out_starved_ms", 0.0),
            "trimmed_ms": counters.get("out_trimmed_ms", 0.0),
            "pa_flags": pa_flags,
        },
    )

    a = snap.audio
    echo = a.echo_description or a.echo_mode
    if echo_mode == "aec" and snap.aec_reduction_db is not None:
        echo = f"{echo}  {-snap.aec_reduction_db:.0f} dB"
    devices = DeviceView(
        input_name=a.input_device or "–", output_name=a.output_device or "–",
        input_rate=f"{a.input_rate / 1000:g}k" if a.input_rate else "",
        output_rate=f"{a.output_rate / 1000:g}k" if a.output_rate else "",
        echo=echo,
    )
    return Views(status=status, audio=audio, latency=latency, engine=engine, devices=devices,
                 silent_mic=bool(snap.mic_silent), persona_name=snap.persona or None,
                 message=snap.message or "", model_db=model_level_db(snap))


def timing_note(snap: Any) -> str:
    """How the stage split is measured (TUI.md §2.2), and the speed paths the frame takes (an
    overlapped encode runs alongside the LM step, so the stages then add up to more than the
    total), for the frame-timing panel."""
    path = getattr(snap, "frame_path", "") or ""
    note = _split_note(snap)
    return f"{note} · {path}" if note and path else note or path


def _split_note(snap: Any) -> str:
    if getattr(snap, "detailed_timing", False):
        return "detailed timing: every frame, costs throughput (t: off)"
    every = getattr(snap, "stage_sample_every", None)
    if every == 1:
        return "stage split: every frame"
    if every:
        return f"stage split sampled 1 frame in {every} (t: every frame)"
    if every == 0:
        return "stage split off: total only (t: every frame)"
    return ""


def model_level_db(snap: Any) -> float:
    v = float(snap.model_out.rms_dbfs)
    return v if math.isfinite(v) else -120.0
