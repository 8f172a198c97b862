"""`parley bench`: full frames (Mimi encode, temporal step, depth transformer, Mimi decode) timed
the way users and we quote them: warm-up, then N frames, per-stage p50 / p95 / max, real-time
factor, text tokens/s, frames/s, load time, persona-switch (prefill) time and peak memory.

Per-stage times need a barrier after each stage, which a production frame does not have, so the
bench runs the N frames twice: once with one barrier per frame (the `total` figures, what a live
session pays) and once with per-stage barriers (the stage split).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.frames import STAGES


@dataclass
class BenchResult:
    data: dict

    def summary_lines(self) -> list[str]:
        d = self.data
        st = d["stages"]
        tot = st["total"]
        split = " / ".join(f"{k} {st[k]['p50_ms']:.2f}" for k in STAGES[:-1] if k in st)
        return [
            f"Model: {d['model']}; {d['quantize_label']}, {d['dtype']}; on {d['device']}; "
            f"mlx {d['mlx_version']}",
            f"Load: {d['load_s']:.2f} s",
            f"Prefill: {d['prefill_frames']} frames in {d['prefill_ms']:.1f} ms "
            f"({d['prefill_frames'] / max(d['prefill_ms'] / 1000, 1e-9):.1f} frames-per-sec)",
            f"Frame: p50 {tot['p50_ms']:.2f} ms, p95 {tot['p95_ms']:.2f} ms, "
            f"max {tot['max_ms']:.2f} ms (budget 80 ms)",
            f"Stages (p50 ms): {split}",
            f"Generation: {d['frames']} frames, {d['frames_per_s']:.1f} frames-per-sec, "
            f"{d['text_tokens_per_s']:.1f} text tokens-per-sec, real-time factor {d['rtf']:.3f}",
            f"Peak memory: {d['peak_memory_gb']:.3f} GB",
        ]


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "max_ms": float(arr.max())}


def run_bench(engine, persona, *, frames: int = 100, warmup: int = 10, load_s: float = 0.0,
              model_label: str = "", quantize: int | None = None, dtype: str = "") -> BenchResult:
    import mlx.core as mx

    rng = np.random.default_rng(0)
    frame = engine.frame_size

    def mic() -> np.ndarray:  # speech-level noise: the content does not change the compute
        return (0.05 * rng.standard_normal(frame)).astype(np.float32)

    prefill_s = engine.start(persona)
    for _ in range(warmup):
        engine.step(mic())

    engine.profile_stages = False
    totals = []
    t_all = time.perf_counter()
    for _ in range(frames):
        t = time.perf_counter()
        engine.step(mic())
        totals.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - t_all

    engine.profile_stages = True
    stage_ms: dict[str, list[float]] = {k: [] for k in STAGES[:-1]}
    for _ in range(frames):
        res = engine.step(mic())
        for k in stage_ms:
            stage_ms[k].append(res.timings_ms.get(k, 0.0))
    engine.profile_stages = False

    stages = {k: _percentiles(v) for k, v in stage_ms.items()}
    stages["total"] = _percentiles(totals)
    frame_s = frame / engine.sample_rate
    data = {
        "model": model_label,
        "frames": frames,
        "warmup": warmup,
        "stages": stages,
        "rtf": (wall / frames) / frame_s,
        "frames_per_s": frames / wall,
        "text_tokens_per_s": frames / wall,  # one text token (pieces and pads) per frame
        "load_s": load_s,
        "prefill_ms": prefill_s * 1000,
        "prefill_frames": getattr(engine, "last_prefill_frames", 0),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "active_memory_gb": mx.get_active_memory() / 1e9,
        "quantize": quantize,
        "quantize_label": f"{quantize}-bit" if quantize else "unquantized",
        "dtype": dtype,
        "device": _device_label(),
        "mlx_version": mx.__version__,
        "platform": platform.platform(),
    }
    return BenchResult(data)


def _device_label() -> str:
    import mlx.core as mx

    dev = str(mx.default_device())
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture")
        if name:
            return f"{dev} {name}"
    except Exception:
        pass
    return dev


def random_full_size_model(dest: Path, seed: int = 0, shape: str = "personaplex-7b") -> Path:
    """Writes a model directory of the real PersonaPlex-7B shape with random bf16 weights (16.7 GB
    on disk, streamed one tensor at a time) for timing and memory measurements."""
    from safetensors.numpy import save_file

    from engine.config import parse_model_config
    from engine.lm.random_weights import write_random_lm_checkpoint
    from engine.mimi.weights import random_mimi_weights
    from engine.tiny import babble, train_tokenizer
    from engine.audiofile import write_wav

    if shape != "personaplex-7b":
        raise ValueError(f"unknown shape {shape}")
    dest = Path(dest)
    (dest / "voices").mkdir(parents=True, exist_ok=True)
    cfg = parse_model_config({})
    (dest / "config.json").write_text(json.dumps({"model_type": "personaplex", "version": "7b-v1"}))
    rng = np.random.default_rng(seed)
    speech = babble(rng, 4.0)
    save_file(random_mimi_weights(cfg.mimi, seed, fit_pcm=speech),
              str(dest / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    train_tokenizer(dest / "tokenizer_spm_32k_3.model")
    write_random_lm_checkpoint(dest / "model.safetensors", cfg.lm, seed=seed, dtype="bfloat16")
    write_wav(dest / "voices" / "BENCH.wav", babble(rng, 3.0), 24000)
    (dest / "RANDOM_WEIGHTS").write_text("random weights for benchmarking\n")
    return dest


def bench_command(args) -> int:
    """Entry point of `parley bench` (called from the CLI)."""
    from engine.duplex import DuplexEngine
    from engine.errors import ParleyError
    from engine.personas import Persona

    scratch = None
    try:
        if args.shape:
            if not args.random_weights:
                raise ParleyError("--shape needs --random-weights (no real weights are downloaded "
                                  "for a shape); or pass --model instead.")
            scratch = Path(tempfile.mkdtemp(prefix="parley-bench-"))
            model_spec = str(random_full_size_model(scratch / "model"))
            label = f"{args.shape}, random weights"
        else:
            model_spec = args.model
            label = args.model or "nvidia/personaplex-7b-v1"
        t0 = time.perf_counter()
        engine = DuplexEngine.load(model_spec, quantize=args.quantize, dtype=args.dtype, seed=0)
        load_s = time.perf_counter() - t0
        if engine.model_dir.is_tiny_random and not args.shape:
            label += ", random weights"
        voices = engine.available_voices()
        persona = Persona(name="bench", prompt="You are a wise and friendly teacher. Answer "
                          "questions or provide advice in a clear and engaging way.",
                          voice=voices[0] if voices else None)
        result = run_bench(engine, persona, frames=args.frames, load_s=load_s,
                           model_label=label, quantize=args.quantize,
                           dtype=engine.dtype)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(result.data))
    else:
        for line in result.summary_lines():
            print(line)
    return 0
