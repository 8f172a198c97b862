"""Where a live frame's time goes, stage by stage, on a 7B-shaped random model (run on the lent
H100; see docs/benchmarks.md). For each stage it separates the time Python spends building the
MLX graph, the time `mx.async_eval` takes to hand the kernels to the device (MLX's encoding) and
the time left waiting for the device. Then it compares, in this one process and interleaved frame
by frame (lent machines differ, so only same-process comparisons are fair), Mimi's compiled and
eager frames, whole `DuplexEngine.step` frames unfused, with the depth transformer through the
fused CUDA kernels of engine/lm/fused.py, and with the temporal one too (the experimental
PARLEY_FUSED_TEMPORAL=0 turns it off), and Mimi's encode overlapped on a worker thread or not. Not a unit test;
the numbers are for deciding what to optimise.

    python3 scripts/bench_frame_parts.py [--frames 50] [--quantize 4] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def p50(values):
    return round(statistics.median(values), 3)


def timed_stage(build, frames: int) -> dict:
    """build() -> arrays to evaluate; returns p50 ms of python build / async hand-off / wait."""
    b, h, w = [], [], []
    for _ in range(frames):
        t0 = time.perf_counter()
        outs = build()
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
        mx.eval(outs)
        t3 = time.perf_counter()
        b.append((t1 - t0) * 1e3)
        h.append((t2 - t1) * 1e3)
        w.append((t3 - t2) * 1e3)
    return {"build_ms": p50(b), "encode_ms": p50(h), "wait_ms": p50(w),
            "total_ms": p50([x + y + z for x, y, z in zip(b, h, w)])}


def compare_options(engine, mic, frames: int, only: list[str] | None = None,
                    tkernel_configs: list[str] = (), plain_mimi=None) -> dict:
    """Whole frames over a full attention window under each opt-in speed path and the defaults,
    interleaved frame by frame in this process -> {variant: p50/p95/max ms}. Each of
    `tkernel_configs` ("BLOCKS_PER_SM,LOADS[,RING_DPL,RING_CHUNK]") adds the temporal step kernel
    under those launch settings (engine/lm/temporal_kernel.py) as a variant. `plain_mimi`, the
    same codec with its transformers on MLX operations, adds "Mimi kernels off"."""
    from engine.lm import sample_kernel
    gen, model = engine.gen, engine.gen.model
    gen.kv.end += gen.kv.slots
    engine.stage_sample_every = 0
    from engine.lm import fused
    # Since session 6 the defaults are early submit + one-kernel sampling + ring attention.
    default = {"early", "sampling", "ring"}
    variants = {"defaults": default, "no early submit": default - {"early"},
                "no one-kernel sampling": default - {"sampling"},
                "no ring attention": default - {"ring"},
                "temporal step kernel": default | {"tkernel"},
                "temporal step kernel, 4 layers a launch": default | {"tkernel4"},
                "products take x 16 bytes at a time": default | {"split"}}
    codecs = {False: engine.mimi}
    if plain_mimi is not None:
        variants["Mimi kernels off"] = default | {"mimi off"}
        codecs[True] = plain_mimi
        plain_mimi.encoder_resets = engine.mimi.encoder_resets  # the worker must not reset either
    if only:
        variants = {k: v for k, v in variants.items() if k in only or k == "defaults"}
    configs = {}
    for c in tkernel_configs:
        configs[f"tk{c}"] = (tuple(int(v) for v in c.split(",")) + (0, 0))[:4]
        variants[f"temporal step kernel {c}"] = default | {f"tk{c}"}
    hd = model.cfg.dim // model.cfg.num_heads
    if not model.temporal.use_fused or not model.temporal.can_attend_fused(hd):
        variants = {k: v - {"ring"} for k, v in variants.items()}
    kernels = {"tkernel", "tkernel4", *configs}
    if not model.temporal.can_run_step_kernel(model.dtype, hd):
        variants = {k: v for k, v in variants.items() if not v & kernels}
    built = {}
    for want in (False, True):  # the frame function with and without the one-kernel draws
        os.environ["PARLEY_FUSED_SAMPLING"] = "1" if want else "0"
        built[want] = gen._make_frame() if (sample_kernel.enabled() or not want) else None
    os.environ.pop("PARLEY_FUSED_SAMPLING")
    variants = {k: (v if built[True] else v - {"sampling"}) for k, v in variants.items()}

    # The product variants and the step kernel's launch settings (layers a launch, blocks an SM,
    # loads in flight) are fixed when the temporal step is traced: one traced step each.
    from engine.lm import temporal_kernel as tk
    saved = fused.SPLIT_X, tk.LAYERS_PER_LAUNCH, tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK

    def key_of(opts):
        layers = 4 if "tkernel4" in opts else saved[1]
        launch = next((configs[o] for o in opts if o in configs), saved[2:])
        return ("split" in opts, layers, *launch)

    steps = {}
    for key in {key_of(v) for v in variants.values()} | {key_of(set())}:
        fused.SPLIT_X, tk.LAYERS_PER_LAUNCH, tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK = key
        tk._kernel.cache_clear()
        model.temporal._step_fns = {}
        for ring, kernel in ((False, False), (True, False), (True, True)):
            model.temporal.ring_attention, model.temporal.step_kernel = ring, kernel
            if kernel and not any(v & kernels and key_of(v) == key for v in variants.values()):
                continue
            outs = model.temporal.warm_up(mx.zeros((1, 1, model.cfg.dim), dtype=model.dtype),
                                          gen.kv)
            if kernel:
                mx.eval(outs)  # builds the kernels while the launch settings are this key's
        steps[key] = model.temporal._step_fns
    fused.SPLIT_X, tk.LAYERS_PER_LAUNCH, tk.BLOCKS_PER_SM, tk.LOADS, tk.RING_DPL, tk.RING_CHUNK = saved
    model.temporal.step_kernel = False

    def use(opts):
        engine.mimi = codecs["mimi off" in opts]
        gen.early_submit = "early" in opts
        gen._frame = built["sampling" in opts]
        model.temporal.ring_attention = "ring" in opts
        model.temporal.step_kernel = bool(opts & kernels)
        model.temporal._step_fns = steps[key_of(opts)]

    def frame_ms():
        t = time.perf_counter()
        engine.step(mic())
        return (time.perf_counter() - t) * 1e3

    for opts in variants.values():  # warm-up: compiles each variant's kernels
        use(opts)
        for _ in range(3):
            frame_ms()
    times = {name: [] for name in variants}
    for _ in range(frames):
        for name, opts in variants.items():
            use(opts)
            times[name].append(frame_ms())
    use(set())
    return {name: {"p50_ms": p50(t), "p95_ms": round(float(np.percentile(t, 95)), 3),
                   "max_ms": round(max(t), 3)} for name, t in times.items()}


def main() -> None:
    from engine.bench import random_full_size_engine, speech_level_noise, start_with_any_voice

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--quantize", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a quick check anywhere)")
    ap.add_argument("--options", action="store_true",
                    help="only whole frames under the opt-in speed paths (early submit, one-kernel "
                         "sampling, ring attention, all three) against the defaults, interleaved")
    ap.add_argument("--variants", nargs="*",
                    help="with --options: only these variants (names as printed) and the defaults")
    ap.add_argument("--tkernel-configs", nargs="*", default=[],
                    help="with --options: the temporal step kernel under each of these launch "
                         "settings, BLOCKS_PER_SM,LOADS[,RING_DPL,RING_CHUNK] (0: the default)")
    ap.add_argument("--temporal", action="store_true",
                    help="only the temporal stage (MLX operations vs fused kernels) and whole "
                         "frames with and without the fused temporal step")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.tiny:
        from engine.duplex import DuplexEngine
        engine, scratch = DuplexEngine.load("tiny", seed=0), None
    else:
        engine, scratch = random_full_size_engine(quantize=args.quantize)
    try:
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        start_with_any_voice(engine, "parts")
        prefill_s = time.perf_counter() - t0
        n = engine.frame_size
        mic = speech_level_noise(n)

        for _ in range(10):
            engine.step(mic())
        result = {"load_s": round(load_s, 1), "prefill_s": round(prefill_s, 1)}
        if args.options:
            plain_mimi = None
            if scratch is not None and engine.mimi.decoder_transformer.kernel:
                from engine.mimi import Mimi
                os.environ["PARLEY_MIMI_KERNEL"] = "0"
                plain_mimi = Mimi.load(scratch / "tokenizer-e351c8d8-checkpoint125.safetensors",
                                       engine.mimi.cfg, num_codebooks=engine.mimi.num_codebooks)
                os.environ.pop("PARLEY_MIMI_KERNEL")
                # As DuplexEngine does: everything derived from the weights evaluated on this
                # thread (arrays left lazy here fail on the encode worker's stream).
                plain_mimi.reset()
                codes = plain_mimi.encode_step(np.zeros(n, np.float32))
                mx.eval(codes, plain_mimi.decode_step(codes))
                plain_mimi.reset()
                mx.eval(plain_mimi.encoder_state_arrays())
            result["frames"] = compare_options(engine, mic, args.frames, args.variants,
                                               args.tkernel_configs, plain_mimi)
            result["temporal step kernel barrier gave up"] = \
                engine.gen.model.temporal.step_kernel_failed()
            print(json.dumps(result, indent=1))
            return

        mimi, gen, model = engine.mimi, engine.gen, engine.gen.model
        codes8 = mx.zeros((8,), mx.int32)
        # The stages below are timed on this thread: the encode worker is switched off meanwhile
        # (the encoder's state must not be left lazy on this thread's stream while it runs).
        overlap = engine.overlap_encode
        engine.overlap_encode = False
        if not args.temporal:
            result["encode"] = timed_stage(lambda: [mimi.encode_step(mic())], args.frames)
            result["decode"] = timed_stage(lambda: [mimi.decode_step(codes8)], args.frames)
        row = gen.tokens_at(gen.position - 1)

        def temporal():
            hn = model.hidden(model.embed_step(row, compiled=True), gen.kv, compiled=True)
            return [hn, *gen.kv.arrays()]

        result["temporal"] = timed_stage(temporal, args.frames)
        if args.temporal and model.temporal.can_fuse(model.dtype):
            saved = model.temporal.use_fused
            model.temporal.use_fused = not saved
            result["temporal " + ("fused" if not saved else "unfused")] = timed_stage(
                temporal, args.frames)
            model.temporal.use_fused = saved
        hn = temporal()[0]
        mx.eval(hn)
        K = model.depformer_steps
        mask, vals = mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32)
        if gen._frame is None:
            gen._frame = gen._make_frame()
        result["depth"] = timed_stage(lambda: gen._frame(hn, mask, vals, gen._next_key()),
                                      args.frames)
        # Mimi's frames compiled or eager, interleaved frame by frame in this one process
        # (machines differ between calls, so only same-process comparisons are fair).
        ab = {mode: {"encode": [], "decode": []} for mode in ("compiled", "eager")}
        for _ in range(0 if args.temporal else args.frames):
            for mode in ab:
                mimi.compile = mode == "compiled"
                for stage, build in (("encode", lambda: mimi.encode_step(mic())),
                                     ("decode", lambda: mimi.decode_step(codes8))):
                    t = time.perf_counter()
                    mx.eval(build())
                    ab[mode][stage].append((time.perf_counter() - t) * 1e3)
        mimi.compile = True
        if not args.temporal:
            result["mimi_p50_ms"] = {m: {k: p50(v) for k, v in d.items()} for m, d in ab.items()}
        # Whole frames over a full attention window, one barrier each: the depth transformer
        # unfused or through engine/lm/fused.py's kernels (where they run), interleaved frame by
        # frame; then blocks of frames with Mimi's encode overlapped on a worker thread or not.
        kv = gen.kv
        kv.end += kv.slots
        engine.stage_sample_every = 0
        # Variants: (depth path, temporal fused): the depth transformer through MLX operations,
        # the per-layer fused kernels or one kernel a step; the temporal one through MLX operations
        # or the fused kernels (the default where they run).
        frames = {}
        can_fuse = model.depformer.can_fuse(model.dtype)
        variants = [("mlx", False)]
        if can_fuse and args.temporal and model.depformer.can_run_step_kernel(model.dtype):
            variants = [("kernel", False)]
            if model.temporal.can_fuse(model.dtype):
                variants.append(("kernel", True))
        elif can_fuse:
            variants.append(("fused", False))
            if model.depformer.can_run_step_kernel(model.dtype):
                variants.append(("kernel", False))
            if model.temporal.can_fuse(model.dtype):
                variants.append((variants[-1][0], True))
        engine.overlap_encode = overlap  # whole frames as the engine runs them
        for path, _ in variants:
            if path not in frames:
                gen.depth_path = path
                frames[path] = gen._make_frame()
        result["fused_available"] = can_fuse
        default = variants[-2] if variants[-1][1] else variants[-1]

        def name(v):
            return {"mlx": "unfused", "fused": "fused depth",
                    "kernel": "depth step kernel"}[v[0]] + (" + fused temporal" if v[1] else "")

        def use(variant):
            path, temporal_fused = variant
            gen._depth_path, gen._frame = path, frames[path]
            model.temporal.use_fused = temporal_fused

        def frame_ms():
            t = time.perf_counter()
            engine.step(mic())
            return (time.perf_counter() - t) * 1e3

        def stats(t):
            return {"p50_ms": p50(t), "p95_ms": round(float(np.percentile(t, 95)), 3),
                    "max_ms": round(max(t), 3)}

        for v in variants:  # warm-up (compiles each frame function)
            use(v)
            for _ in range(3):
                frame_ms()
        times = {v: [] for v in variants}
        for _ in range(args.frames):
            for v in variants:
                use(v)
                times[v].append(frame_ms())
        result["frames"] = {name(v): stats(t) for v, t in times.items()}
        for v in [] if args.temporal else variants[1:]:
            if not v[1]:
                use(v)
                result["depth " + v[0]] = timed_stage(
                    lambda: gen._frame(hn, mask, vals, gen._next_key()), args.frames)
        use(default)  # the defaults
        blocks = {}
        for overlap in () if args.temporal else (False, True, False, True):
            engine.overlap_encode = overlap
            for _ in range(3):
                frame_ms()
            blocks.setdefault(overlap, []).extend(frame_ms() for _ in range(args.frames))
        engine.overlap_encode = False
        engine.close()
        if not args.temporal:
            result["overlap_encode"] = {("on" if o else "off"): stats(t) for o, t in blocks.items()}
        print(json.dumps(result, indent=1))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
