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
import zlib
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
            f"({d['prefill_frames'] / max(d['prefill_ms'] / 1000, 1e-9):.1f} frames-per-sec)"
            + (f"; a persona switch after that: {d['switch_prefill_ms']:.1f} ms"
               if d.get("switch_prefill_ms") is not None else ""),
            f"Frame: p50 {tot['p50_ms']:.2f} ms, p95 {tot['p95_ms']:.2f} ms, "
            f"max {tot['max_ms']:.2f} ms (budget 80 ms; attending over "
            f"{d['attended_positions']} positions, context {d['context']})",
            f"Stages (p50 ms): {split}" + (
                " (encode overlapped with the LM step)" if d.get("overlap_encode") else ""),
            "Depth transformer: " + _DEPTH_PATHS.get(d.get("depth_path", ""), "MLX operations")
            + (" ({blocks} blocks of {warps} warps)".format(**d["depth_kernel_launch"])
               if d.get("depth_kernel_launch") else "")
            + "; temporal: " + ("CUDA kernels of several layers each"
                                + (" (products on the tensor cores)"
                                   if (d.get("temporal_kernel_launch") or {}).get(
                                       "tensor_core_products") else "")
                                if d.get("temporal_kernel")
                                else "fused CUDA kernels" if d.get("temporal_fused")
                                else "MLX operations")
            + (" with ring attention" if d.get("ring_attention") and not d.get("temporal_kernel")
               else "")
            + ("; top-k draws: one CUDA kernel each" if d.get("one_kernel_draws") else "")
            + ("; stages submitted as built" if d.get("early_submit") else "")
            + ("; the next temporal step chained ahead"
               + (" on the device's user codes" if d.get("codes_on_device")
                  and d.get("overlap_encode") else "")
               if d.get("chain_ahead") and d.get("presubmit") else "")
            + ("; Mimi transformers: CUDA kernels" if d.get("mimi_kernels") else ""),
            *([f"Latency at real-time pace: p50 {d['paced_latency']['p50_ms']:.2f} ms, p95 "
               f"{d['paced_latency']['p95_ms']:.2f} ms from a frame's audio to its output (a frame "
               f"every 80 ms" + ("; the next temporal step submitted as each frame ends)"
                                 if d.get("presubmit") else ")")] if d.get("paced_latency") else []),
            f"Generation: {d['frames']} frames, {d['frames_per_s']:.1f} frames-per-sec, "
            f"{d['text_tokens_per_s']:.1f} text tokens-per-sec, real-time factor {d['rtf']:.3f}",
            f"Peak memory: {d['peak_memory_gb']:.3f} GB"
            + (f" (the model after loading {d['model_memory_gb']:.3f} GB, the KV ring "
               f"{d['kv_ring_gb']:.3f} GB" + (f" in {d['kv_bits']} bits" if d.get("kv_bits") else "")
               + ")" if "model_memory_gb" in d else ""),
        ]


# How the live depth transformer runs (LMGen.depth_path), in the summary's words.
_DEPTH_PATHS = {"mlx": "MLX operations", "fused": "fused CUDA kernels, four a layer",
                "kernel": "one CUDA kernel a step"}

def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "max_ms": float(arr.max())}


def speech_level_noise(frame: int, seed: int = 0):
    """A microphone stand-in for timing: each call, one frame of speech-level noise (what it
    holds does not change the compute)."""
    rng = np.random.default_rng(seed)
    return lambda: (0.05 * rng.standard_normal(frame)).astype(np.float32)


def start_with_any_voice(engine, name: str) -> float:
    """Starts a short persona with the model's first voice (timing scripts); returns seconds."""
    from engine.personas import Persona
    voices = engine.available_voices()
    return engine.start(Persona(name=name, prompt="You are helpful.",
                                voice=voices[0] if voices else None))


def run_bench(engine, persona, *, frames: int = 100, warmup: int = 10, load_s: float = 0.0,
              model_label: str = "", quantize: int | None = None, dtype: str = "",
              full_context: bool = True, paced_frames: int = 25,
              switch: bool = True) -> BenchResult:
    """Warm-up, `frames` back-to-back frames (the totals, one barrier each), as many with a
    barrier between stages (the split), then `paced_frames` at real-time pace: one every 80 ms,
    as a live conversation feeds them, each timed from its audio to its output (the latency a
    user hears; with `presubmit` the 7B step runs in the gap before the frame). With `switch`,
    last, the persona started again: the prefill a persona switch costs once its kernels are
    compiled (the first prefill includes compiling them on a GPU)."""
    import mlx.core as mx

    from engine.lm import depth_kernel, temporal_kernel

    frame = engine.frame_size
    mic = speech_level_noise(frame)

    # What the model holds once loaded (weights of the LM and Mimi), before the conversation's KV
    # ring and activations exist: the figure the memory targets of issue 8 are about.
    model_gb = mx.get_active_memory() / 1e9
    prefill_s = engine.start(persona)
    kv = engine.gen.kv
    if full_context:
        # Steady state of a conversation longer than the attention window: move the ring's clock
        # on by one window, so every frame attends over a full ring (the contents do not change
        # the cost). The reference's fixed-size ring always costs this much.
        kv.advance(kv.slots)
    for _ in range(warmup):
        engine.step(mic())

    engine.profile_stages = False
    engine.stage_sample_every = 0  # totals with exactly one barrier per frame
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

    period = frame / engine.sample_rate
    paced = []
    due = time.perf_counter()
    for _ in range(paced_frames):
        due += period
        time.sleep(max(0.0, due - time.perf_counter()))
        t = time.perf_counter()
        engine.step(mic(), defer_next=True)  # as the live session: output first (runner.py),
        paced.append((time.perf_counter() - t) * 1000)
        engine.after_step()  # then the next frame's temporal step
        due = max(due, time.perf_counter())  # a frame slower than real time: no catching up

    attended = kv.filled  # before the switch below starts the conversation afresh
    switch_s = engine.start(persona) if switch else None

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
        "switch_prefill_ms": switch_s * 1000 if switch_s is not None else None,
        "context": "full" if full_context else "after prompt",
        "overlap_encode": bool(getattr(engine, "overlap_encode", False)),
        "fused_depth": bool(getattr(engine.gen, "fused", False)),
        "depth_path": getattr(engine.gen, "depth_path", "mlx"),
        "temporal_fused": bool(engine.gen.model.temporal.use_fused),
        "ring_attention": bool(engine.gen.model.temporal.ring_attention),
        "temporal_kernel": bool(engine.gen.model.temporal.step_kernel),
        "temporal_kernel_launch": (temporal_kernel.launch_settings(
            engine.gen.model.temporal, engine.gen.model.dtype, kv.slots)
            if engine.gen.model.temporal.step_kernel else None),
        "depth_kernel_launch": ({"blocks": depth_kernel.grid_blocks(), "warps": depth_kernel.WARPS}
                                if getattr(engine.gen, "depth_path", "mlx") == "kernel" else None),
        "one_kernel_draws": bool(getattr(engine.gen, "one_kernel_draws", False)),
        "early_submit": bool(getattr(engine.gen, "early_submit", False)),
        "presubmit": bool(getattr(engine.gen, "presubmit", False)),
        "chain_ahead": bool(getattr(engine.gen, "chain_ahead", False)),
        "encode_after_issue": bool(engine.overlap_encode
                                   and getattr(engine, "encode_after_issue", False)),
        "codes_on_device": bool(engine.overlap_encode and getattr(engine, "codes_on_device", False)),
        "weight_tables": bool(engine.gen.model.temporal.step_kernel
                              and engine.gen.model.temporal.weight_tables),
        "paced_latency": _percentiles(paced) if paced else None,
        "mimi_kernels": bool(getattr(engine.mimi.decoder_transformer, "kernel", False)),
        "mimi_transformer_weights": str(getattr(engine.mimi, "transformer_weights", "float32")),
        "attended_positions": attended,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "model_memory_gb": model_gb,
        "kv_ring_gb": kv.nbytes() / 1e9,
        "kv_bits": kv.bits,  # None: the compute dtype
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


class _RandomLMWeights:
    """A lazy mapping of the real checkpoint's tensor names to random MLX arrays (bf16), generated
    on the device when the loader reads them: a 7B-shaped model without a 16.7 GB file."""

    def __init__(self, cfg, seed: int = 0):
        from engine.lm.checkpoint import expected_lm_tensors

        self.cfg = cfg
        self.shapes = expected_lm_tensors(cfg)
        self.seed = seed

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def keys(self):
        return self.shapes.keys()

    def __getitem__(self, key):
        import mlx.core as mx

        shape = self.shapes[key]
        rkey = mx.random.key(self.seed + zlib.crc32(key.encode()))
        if key.endswith(".alpha"):
            return mx.random.uniform(0.5, 1.5, shape, key=rkey).astype(mx.bfloat16)
        scale = 1.0 / np.sqrt(shape[-1])
        if key == "text_emb.weight" or key.startswith("emb."):
            scale = 1.0 / np.sqrt(self.cfg.n_q + 1)
        elif key.startswith("depformer_text_emb") or key.startswith("depformer_emb"):
            scale = 1.0
        return (mx.random.normal(shape, key=rkey) * scale).astype(mx.bfloat16)


def random_full_size_engine(shape: str = "personaplex-7b", *, quantize: int | None = 4,
                            dtype: str = "bfloat16", seed: int = 0, quantize_tables: bool = True,
                            kv_bits: int | None | str = "auto", mimi_weights: str = "auto"):
    """A DuplexEngine of the real PersonaPlex-7B shape with random weights generated on the
    device (LM) and a random full-size Mimi, for timing and memory figures. The scratch folder
    (Mimi file, tokenizer, a voice) is returned too, to be removed by the caller.
    `quantize_tables`, `kv_bits`, `mimi_weights`: as DuplexEngine.load takes them."""
    from safetensors.numpy import save_file

    from engine.audiofile import write_wav
    from engine.config import parse_model_config
    from engine.duplex import DuplexEngine, resolve_kv_bits, resolve_mimi_weights
    from engine.lm import LMModel
    from engine.mimi import Mimi
    from engine.mimi.weights import random_mimi_weights
    from engine.model_dir import ModelDir
    from engine.prompts import TextTokenizer
    from engine.tiny import babble, train_tokenizer

    if shape != "personaplex-7b":
        raise ValueError(f"unknown shape {shape}")
    scratch = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    (scratch / "voices").mkdir()
    cfg = parse_model_config({"model_type": "personaplex", "version": "7b-v1"})
    (scratch / "config.json").write_text(json.dumps({"model_type": "personaplex"}))
    rng = np.random.default_rng(seed)
    mimi_path = scratch / "tokenizer-e351c8d8-checkpoint125.safetensors"
    save_file(random_mimi_weights(cfg.mimi, seed, fit_pcm=babble(rng, 4.0)), str(mimi_path))
    train_tokenizer(scratch / "tokenizer_spm_32k_3.model")
    write_wav(scratch / "voices" / "BENCH.wav", babble(rng, 3.0), cfg.mimi.sample_rate)
    (scratch / "RANDOM_WEIGHTS").write_text("random weights for benchmarking\n")
    model_dir = ModelDir(path=scratch, config=cfg, source=f"{shape} (random weights)")
    mimi = Mimi.load(mimi_path, cfg.mimi, num_codebooks=cfg.lmgen.mimi_num_codebooks,
                     transformer_weights=resolve_mimi_weights(mimi_weights, quantize))
    lm = LMModel.from_weights(_RandomLMWeights(cfg.lm, seed), cfg.lm, dtype=dtype,
                              quantize=quantize, quantize_embeddings=quantize_tables,
                              quantize_heads=quantize_tables)
    tokenizer = TextTokenizer.from_model_dir(scratch)
    engine = DuplexEngine(model_dir, lm, mimi, tokenizer, dtype=dtype, quantize=quantize,
                          greedy=False, seed=seed, kv_bits=resolve_kv_bits(kv_bits, quantize))
    return engine, scratch


def bench_command(args) -> int:
    """Entry point of `parley bench` (called from the CLI)."""
    from engine.duplex import DuplexEngine
    from engine.errors import ParleyError
    from engine.personas import Persona

    scratch = None
    try:
        t0 = time.perf_counter()
        if args.shape:
            if not args.random_weights:
                raise ParleyError("--shape needs --random-weights (no real weights are downloaded "
                                  "for a shape); or pass --model instead.")
            engine, scratch = random_full_size_engine(
                args.shape, quantize=args.quantize or None, dtype=args.dtype or "bfloat16",
                kv_bits=getattr(args, "kv_bits", "auto"))
            label = f"{args.shape}, random weights"
        else:
            label = args.model or "nvidia/personaplex-7b-v1"
            engine = DuplexEngine.load(args.model, quantize=args.quantize, dtype=args.dtype, seed=0,
                                       kv_bits=getattr(args, "kv_bits", "auto"))
        load_s = time.perf_counter() - t0
        if engine.model_dir.is_tiny_random and not args.shape:
            label += ", random weights"
        if getattr(args, "overlap_encode", None) is not None:
            engine.overlap_encode = bool(args.overlap_encode)
        voices = engine.available_voices()
        persona = Persona(name="bench", prompt="You are a wise and friendly teacher. Answer "
                          "questions or provide advice in a clear and engaging way.",
                          voice=voices[0] if voices else None)
        if args.presubmit is not None:
            engine.gen.presubmit = args.presubmit
        result = run_bench(engine, persona, frames=args.frames, warmup=args.warmup, load_s=load_s,
                           model_label=label, quantize=engine.quantize,
                           dtype=engine.dtype, full_context=args.context == "full",
                           paced_frames=min(args.paced_frames, args.frames),
                           switch=args.switch)
        engine.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(result.data))
    else:
        for line in result.summary_lines():
            print(line)
    return 0
