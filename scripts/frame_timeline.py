"""A live frame's timeline on the lent GPU: when the host finishes issuing each stage and when
the device finishes running it, from the same frames (a 7B-shaped random model by default). Not a
unit test; it answers "is the frame waiting on the host or on the device, and where?".

Device times come from marker kernels: a one-thread kernel that stores the GPU's %globaltimer
(ns), chained after a stage's output with `mx.depends`, so it runs when that output is ready
(on the encode worker's stream for the encode). The GPU clock is mapped onto the host's by
timing markers on an idle device (the narrowest bracket wins, typically within ~10 us). Each
marker is one extra tiny launch (~5 us of host time); the figures include them.

    python3 scripts/frame_timeline.py [--frames 60] [--paced-frames 30] [--quantize 4] [--tiny]

Printed: p50 milliseconds from the start of `DuplexEngine.step` for each host event and each
device marker, back to back and at real-time pace (a frame every 80 ms), with the next frame's
temporal step handed to the device as a frame ends (the default) and built inside its frame.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402

_SOURCE = """
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (threadIdx.x == 0 && blockIdx.x == 0) { out[0] = (long long)t; }
"""


class Markers:
    """Device clock markers; on a backend without CUDA kernels, none (host events only)."""

    def __init__(self):
        self.kernel = None
        if mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available():
            self.kernel = mx.fast.cuda_kernel(name="parley_timeline_marker", input_names=["dep"],
                                              output_names=["out"], source=_SOURCE)
        self.offset_ns = 0  # host perf_counter_ns = GPU globaltimer - offset

    def mark(self, dep: mx.array) -> mx.array | None:
        if self.kernel is None:
            return None
        return self.kernel(inputs=[dep], output_shapes=[(1,)], output_dtypes=[mx.int64],
                           grid=(1, 1, 1), threadgroup=(32, 1, 1))[0]

    def calibrate(self, tries: int = 50) -> float:
        """Maps the GPU clock onto perf_counter_ns; returns the bracket's width in us."""
        if self.kernel is None:
            return 0.0
        best = None
        dep = mx.zeros((1,), mx.float32)
        mx.eval(dep, self.mark(dep))  # compiles the marker
        for _ in range(tries):
            m = self.mark(dep)
            h0 = time.perf_counter_ns()
            mx.eval(m)
            h1 = time.perf_counter_ns()
            width = h1 - h0
            if best is None or width < best[0]:
                best = (width, int(m.item()) - (h0 + h1) // 2)
        self.offset_ns = best[1]
        return best[0] / 1e3

    def host_ns(self, marker: mx.array) -> int:
        return int(marker.item()) - self.offset_ns


def instrument(engine, markers: Markers):
    """Wraps the engine's stage functions to record host events and chain device markers into
    each stage's output. Returns the per-frame record (a dict filled during engine.step)."""
    gen, model, mimi = engine.gen, engine.gen.model, engine.mimi
    frame: dict = {"host": {}, "device": {}}
    lock = threading.Lock()

    def host(name):
        with lock:
            frame["host"].setdefault(name, time.perf_counter_ns())

    def chain(name, out):
        m = markers.mark(out)
        if m is None:
            return out
        frame["device"][name] = m
        return mx.depends([out], [m])[0]

    hidden = model.hidden
    # The frame function frame_w wraps: a variant may swap in another (instrument.inner["fn"]).
    inner = instrument.inner = {"fn": gen._frame}
    encode_step, decode_step = mimi.encode_step, mimi.decode_step
    async_eval, eval_ = mx.async_eval, mx.eval

    def hidden_w(x, kv, *a, **k):
        # Built after the frame's decode: the next frame's step, handed over ahead.
        tag = "next temporal" if "decode built" in frame["host"] else "temporal"
        host(f"{tag} built")
        x = chain(f"{tag} start", x)
        return chain(f"{tag} end", hidden(x, kv, *a, **k))

    def frame_w(hn, *a):
        host("depth build start")
        outs = list(inner["fn"](hn, *a))
        host("depth built")
        outs[0] = chain("depth end", outs[0])
        return outs

    def encode_w(pcm):
        on_worker = threading.current_thread() is not threading.main_thread()
        tag = "encode (worker)" if on_worker else "encode (main)"
        host(f"{tag} start")
        codes = encode_step(pcm)
        host(f"{tag} built")
        return chain(f"{tag} end", codes)

    def decode_w(codes):
        host("decode build start")
        pcm = decode_step(codes)
        host("decode built")
        return chain("decode end", pcm)

    def async_eval_w(*a):
        async_eval(*a)
        if threading.current_thread() is threading.main_thread():
            if "next temporal built" in frame["host"]:
                host("next temporal submitted")
            elif "depth built" in frame["host"]:
                host("depth submitted")
            else:
                host("temporal submitted")

    def eval_w(*a):
        main = threading.current_thread() is threading.main_thread()
        if main and "decode built" in frame["host"]:
            host("final eval start")
        eval_(*a)
        if main and "decode built" in frame["host"]:
            host("final eval end")
        elif not main:
            host("encode (worker) evaluated")

    model.hidden, gen._frame = hidden_w, frame_w
    mimi.encode_step, mimi.decode_step = encode_w, decode_w
    mx.async_eval, mx.eval = async_eval_w, eval_w
    return frame


def run(engine, mic, frames: int, markers: Markers, frame: dict, paced: bool = False) -> list:
    """Frames back to back (or one every 80 ms) -> per-frame records. Device markers are read
    only after all frames: reading one waits for it, and a marker chained into the next frame's
    early temporal step would otherwise stall the overlap being measured."""
    rows = []
    period = engine.frame_size / engine.sample_rate
    due = time.perf_counter()
    for _ in range(frames):
        if paced:
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))
        frame["host"], frame["device"] = {}, {}
        t0 = time.perf_counter_ns()
        if paced:  # as the live session: the output first, then the next step (runner.py)
            engine.step(mic(), defer_next=True)
            t1 = time.perf_counter_ns()
            engine.after_step()
        else:
            engine.step(mic())
            t1 = time.perf_counter_ns()
        rows.append((t0, t1, frame["host"], frame["device"]))
    return rows


def summarize(rows: list, markers: Markers) -> dict:
    out = []
    for t0, t1, host, device in rows:
        row = {k: (v - t0) / 1e6 for k, v in host.items()}
        row.update({f"[gpu] {k}": (markers.host_ns(m) - t0) / 1e6 for k, m in device.items()})
        row["step returned"] = (t1 - t0) / 1e6
        out.append(row)
    keys = sorted({k for r in out for k in r}, key=lambda k: statistics.median(
        [r[k] for r in out if k in r]))
    return {k: round(statistics.median([r[k] for r in out if k in r]), 3) for k in keys}


def main() -> None:
    from engine.bench import random_full_size_engine, speech_level_noise, start_with_any_voice

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--quantize", type=int, default=4)
    ap.add_argument("--paced-frames", type=int, default=30)
    ap.add_argument("--out", help="also write the results here after each section")
    ap.add_argument("--depth-blocks", type=int, nargs="*", default=[],
                    help="also time back-to-back frames with the depth step kernel over this many "
                         "blocks (depth_kernel.BLOCKS; default one a multiprocessor)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a quick check anywhere)")
    ap.add_argument("--only", nargs="*", default=[],
                    help="only the variants whose names contain one of these ('_' stands "
                         "for a space)")
    ap.add_argument("--depth-prefetch", action="store_true",
                    help="also time the defaults with the depth step kernel's L2 prefetch "
                         "(PARLEY_DEPTH_PREFETCH) and, with --prefetch, each mask with it")
    ap.add_argument("--depth-warps", type=int, nargs="*", default=[],
                    help="also time the defaults with this many warps a depth step kernel block "
                         "(PARLEY_DEPTH_WARPS)")
    ap.add_argument("--prefetch", type=int, nargs="*", default=[],
                    help="also time the defaults with each of these L2 prefetch masks "
                         "(PARLEY_TEMPORAL_PREFETCH)")
    ap.add_argument("--mma", action="store_true",
                    help="also time the defaults, and chain ahead with the codes on the device, "
                         "with the temporal kernel's tensor-core products (PARLEY_TEMPORAL_MMA)")
    args = ap.parse_args()
    if args.tiny:
        from engine.duplex import DuplexEngine
        engine, scratch = DuplexEngine.load("tiny", seed=0), None
    else:
        engine, scratch = random_full_size_engine(quantize=args.quantize)
    try:
        start_with_any_voice(engine, "timeline")
        engine.gen.kv.end += engine.gen.kv.slots  # a full attention window, as the bench
        engine.stage_sample_every = 0  # one barrier a frame
        mic = speech_level_noise(engine.frame_size)

        for _ in range(10):
            engine.step(mic())
        markers = Markers()
        result = {"device": str(mx.default_device()), "calibration_us": markers.calibrate()}
        frame = instrument(engine, markers)
        gen = engine.gen
        temporal = gen.model.temporal
        # Back to back, in alternating blocks (the next frame picks up a step handed over ahead,
        # so variants cannot alternate frame by frame), then at real-time pace. A variant is
        # session 13's defaults (pre-submission, weight tables; no chain ahead, codes through
        # the host, CUDA-core products) with some settings changed:
        # presubmit, split (each temporal launch handed over as built), chain (chain ahead),
        # nb (depth kernel blocks), tables (PARLEY_WEIGHT_TABLE), lpl (layers a launch),
        # after (the encode queued once the frame is handed over, PARLEY_ENCODE_AFTER), cod (the
        # worker's codes handed over as a device array once queued, PARLEY_CODES_ON_DEVICE), mma
        # (the temporal kernel's tensor-core products, PARLEY_TEMPORAL_MMA).
        from engine.lm import depth_kernel, temporal_kernel
        # pf (the step kernel's L2 prefetch mask, PARLEY_TEMPORAL_PREFETCH; None: the default).
        # dpf (the depth step kernel's L2 prefetch, PARLEY_DEPTH_PREFETCH).
        # dw (warps a depth step kernel block, PARLEY_DEPTH_WARPS).
        V = dict(presubmit=True, split=False, chain=False, nb=0, tables=True, lpl=0, after=False,
                 cod=False, mma=False, pf=None, dpf=depth_kernel.PREFETCH, dw=depth_kernel.WARPS)
        # The engine's defaults now (session 14: chain ahead and codes on the device on CUDA,
        # tensor-core products at 4 bits): as this process's environment left them.
        now = {**V, "chain": gen.chain_ahead, "cod": engine.codes_on_device,
               "mma": temporal_kernel.MMA}
        variants = {"the engine's defaults": now,
                    "next temporal step submitted ahead": V,
                    "temporal step built in its frame": {**V, "presubmit": False},
                    "next step built before the barrier (chain ahead)": {**V, "chain": True},
                    "submitted ahead, encode queued after the frame is issued": {**V,
                                                                                 "after": True},
                    "chain ahead, codes on the device": {**V, "chain": True, "cod": True}}
        if temporal.step_kernel:
            variants["submitted ahead, each launch handed over as built"] = {**V, "split": True}
            variants["chain ahead, each launch handed over as built"] = {**V, "split": True,
                                                                         "chain": True}
            variants["submitted ahead, weights as inputs (no tables)"] = {**V, "tables": False}
            variants["chain ahead, split, encode after"] = {**V, "split": True, "chain": True,
                                                            "after": True}
            hd = gen.cfg.dim // gen.cfg.num_heads
            if temporal_kernel.supports(temporal, gen.model.dtype, hd, layers_a_launch=16):
                variants["submitted ahead, 16 layers a launch"] = {**V, "lpl": 16}
            if args.mma:
                variants["next temporal step submitted ahead, tensor-core products"] = {
                    **V, "mma": True}
                variants["chain ahead, codes on the device, tensor-core products"] = {
                    **V, "chain": True, "cod": True, "mma": True}
            for pf in args.prefetch:
                variants[f"submitted ahead, L2 prefetch {pf}"] = {**V, "pf": pf}
                if args.depth_prefetch:
                    variants[f"submitted ahead, L2 prefetch {pf} and depth prefetch"] = {
                        **V, "pf": pf, "dpf": 1}
        if args.depth_prefetch and gen.depth_path == "kernel":
            variants["submitted ahead, depth prefetch"] = {**V, "dpf": 1}
        for dw in args.depth_warps if gen.depth_path == "kernel" else []:
            variants[f"next temporal step submitted ahead, depth blocks of {dw} warps"] = {
                **V, "dw": dw}
        # The depth step kernel over fewer blocks (--depth-blocks) or with its L2 prefetch: its
        # grid and template are fixed when the depth chain is traced (on a frame function's first
        # call, with apply's settings), so each has its own frame function.
        frames_fn = {(0, V["dpf"], V["dw"]): instrument.inner["fn"]}
        for nb in args.depth_blocks:
            variants[f"next temporal step submitted ahead, depth over {nb} blocks"] = {**V,
                                                                                     "nb": nb}
        variants = {k: v for k, v in variants.items()
                    if not args.only or any(o.replace("_", " ") in k for o in args.only)}
        default_lpl, default_pf = temporal_kernel.LAYERS_PER_LAUNCH, temporal_kernel.PREFETCH

        def apply(v):
            gen.presubmit, temporal.split_submit, gen.chain_ahead = (v["presubmit"], v["split"],
                                                                     v["chain"])
            temporal.weight_tables = v["tables"]
            temporal_kernel.LAYERS_PER_LAUNCH = v["lpl"] or default_lpl
            temporal_kernel.PREFETCH = default_pf if v["pf"] is None else v["pf"]
            temporal_kernel.MMA = v["mma"]
            engine.encode_after_issue = v["after"]
            engine.codes_on_device = v["cod"]
            depth_kernel.BLOCKS, depth_kernel.PREFETCH, depth_kernel.WARPS = (v["nb"], v["dpf"],
                                                                              v["dw"])
            key = (v["nb"], v["dpf"], v["dw"])
            if key not in frames_fn:
                frames_fn[key] = gen._make_frame()
            instrument.inner["fn"] = frames_fn[key]

        blocks = {name: [] for name in variants}
        for _ in range(2):
            for name, v in variants.items():
                apply(v)
                run(engine, mic, 3, markers, frame)  # warm-up: compiles the marker chains
                blocks[name] += run(engine, mic, args.frames // 2, markers, frame)
        apply(now)
        def save():  # after each section, so a run cut short still leaves what it measured
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)

        for name in variants:
            result[f"back to back, {name}"] = summarize(blocks[name], markers)
        save()
        for name, v in variants.items():
            if v["chain"] or v["nb"]:
                continue  # at real-time pace the live path hands the output over first
            # (depth warps are timed at pace too: a block that fills an SM waits for the encode)
            apply(v)
            run(engine, mic, 2, markers, frame)
            result[f"real-time pace, {name}"] = summarize(
                run(engine, mic, args.paced_frames, markers, frame, paced=True), markers)
            save()
        apply(now)
        engine.close()
        print(json.dumps(result, indent=1))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
