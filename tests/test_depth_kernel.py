"""engine/lm/depth_kernel.py: the whole depth step as one CUDA kernel.

The kernel needs MLX's CUDA backend; here (any machine) the wrapper and the engine's wiring are
checked against the kernel's declaration with a stand-in for `mx.fast.cuda_kernel`. On a CUDA
machine the tests marked `cuda` compare the kernel's frames with the MLX operations', and
`scripts/check_fused_kernels.py` compares each step's logits, keys and values with the unfused
step on the 7B's shapes (and compiles every variant with NVRTC anywhere).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from engine.lm import depth_kernel, fused

cuda = pytest.mark.skipif(not fused.enabled(), reason="needs MLX's CUDA backend")

TYPES = {"n1": mx.float32, "n2": mx.float32, "tok": mx.int32, "sync": mx.uint32}


def _stand_in(monkeypatch, calls: list) -> None:
    """mx.fast.cuda_kernel replaced by a stand-in that checks each call against the kernel's
    declaration and returns zeros of the declared output shapes; `calls` records the depth step
    kernel's calls."""

    def fake_cuda_kernel(**kw):
        def call(*, inputs, template, output_shapes, output_dtypes, grid, threadgroup):
            assert len(inputs) == len(kw["input_names"]), kw["name"]
            assert len(output_shapes) == len(kw["output_names"]) == len(output_dtypes)
            for name, a in zip(kw["input_names"], inputs):
                want = TYPES.get(name.split("_")[0])
                if want is not None:
                    assert a.dtype == want, name
            if not kw["name"].startswith("parley_depth_step"):  # e.g. the top-k draws
                return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
            calls.append({"kw": kw, "t": dict(template), "inputs": dict(zip(kw["input_names"], inputs)),
                          "shapes": output_shapes, "grid": grid, "block": threadgroup})
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    # A cache of its own for the stand-in's kernels, dropped with the monkeypatch: a stand-in
    # left in the module's cache would be the kernel a later CUDA test runs.
    monkeypatch.setattr(depth_kernel, "_kernel", functools.cache(depth_kernel._kernel.__wrapped__))


@pytest.fixture
def gen(tiny_dir):
    from engine.duplex import DuplexEngine
    return DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen


def test_rows_per_warp_spread_a_phase_over_the_grid():
    assert depth_kernel._rows_per_warp(1024, 1056) == 1
    assert depth_kernel._rows_per_warp(3072, 1056) == 4
    assert depth_kernel._rows_per_warp(2816, 2112) == 2
    assert depth_kernel._rows_per_warp(88, 256) == 1
    assert depth_kernel._rows_per_warp(3, 1) == 1  # odd: one row a task


def test_the_tiny_depformer_fits_the_kernel(gen):
    dep = gen.model.depformer
    assert depth_kernel.supports(dep, mx.float32)
    assert not depth_kernel.supports(dep, mx.float16)


def test_each_step_passes_its_own_weights_table_and_keys(gen, monkeypatch):
    calls = []
    _stand_in(monkeypatch, calls)
    try:
        model = gen.model
        dep = model.depformer
        hn = mx.zeros((1, 1, model.cfg.dim), dtype=mx.float32)
        kvs = []
        for k in range(3):
            logits, kv = dep.step_kernel(k, hn, mx.array(5, dtype=mx.int32), kvs)
            assert logits.shape == (model.cfg.card,)
            kvs.append(kv)
    finally:
        depth_kernel._kernel.cache_clear()
    D, L = model.cfg.depformer_dim, len(dep.layers)
    assert kvs[0].shape == (L * 2 * D,)
    for k, c in enumerate(calls):
        ins, t = c["inputs"], c["t"]
        assert ins["win"] is dep.depformer_in.step(k).weight  # step k's views, never copies
        assert ins["wq_0"] is dep.layers[0].in_proj.step(k).weight
        assert ins["wd_0"] is dep.layers[0].linear_out.step(k).weight
        assert ins["hw"] is dep.heads.step(k).weight
        assert ins["emb"] is (dep.text_emb if k == 0 else dep.emb[k - 1]).weight
        assert ins["sync"] is dep._barrier
        assert [ins[f"kv{j}"].size for j in range(k)] == [L * 2 * D] * k
        assert t["NKV"] == k and t["D"] == D and t["L"] == L and t["H"] == dep.num_heads
        assert t["HIN"] == model.cfg.dim and t["CARD"] == model.cfg.card
        assert t["HID"] == dep.layers[0].linear_out.step(0).weight.shape[-1]
        assert c["block"] == (depth_kernel.WARPS * 32, 1, 1)
        assert c["grid"][0] == depth_kernel.grid_blocks() * depth_kernel.WARPS * 32
        assert c["shapes"][:2] == [(model.cfg.card,), (L * 2 * D,)]
    # One kernel build per number of earlier steps attended, named by a digest of its source
    # (MLX caches builds on disk by name).
    import hashlib
    assert len({c["kw"]["name"] for c in calls}) == 3
    for c in calls:
        kw = c["kw"]
        digest = hashlib.sha1((kw["header"] + kw["source"]).encode()).hexdigest()[:12]
        assert kw["name"] == f"parley_depth_step_{digest}"


def test_the_live_frame_runs_one_kernel_per_depth_step(gen, monkeypatch):
    monkeypatch.setattr(fused, "enabled", lambda: True)
    calls = []
    _stand_in(monkeypatch, calls)
    try:
        assert gen.model.depformer.can_run_step_kernel(mx.float32)
        gen.depth_path = "kernel"
        assert gen.fused is True
        gen.compile = False
        frame = gen._make_frame()
        K = gen.model.depformer_steps
        hn = mx.zeros((1, 1, gen.cfg.dim), dtype=mx.float32)
        outs = frame(hn, mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32), mx.random.key(0))
        mx.eval(outs)
    finally:
        depth_kernel._kernel.cache_clear()
    assert outs[0].shape == (K + 1,)
    assert [c["t"]["NKV"] for c in calls] == list(range(K))


def test_nvidias_ring_rule_drops_step_0_from_the_step_that_fills_the_ring(tiny_dir, monkeypatch):
    """depformer.py: with 16 of 16 steps, step 15 attends to steps 1..15 under NVIDIA's rule."""
    from engine.duplex import DuplexEngine
    monkeypatch.setattr(fused, "enabled", lambda: True)
    gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", depformer_steps=16).gen
    calls = []
    _stand_in(monkeypatch, calls)
    try:
        gen.depth_path = "kernel"
        gen.compile = False
        K = 16
        frame = gen._make_frame()
        hn = mx.zeros((1, 1, gen.cfg.dim), dtype=mx.float32)
        mx.eval(frame(hn, mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32),
                      mx.random.key(0)))
    finally:
        depth_kernel._kernel.cache_clear()
    assert gen.reference == "nvidia"
    assert [c["t"]["NKV"] for c in calls] == list(range(15)) + [14]


def test_parley_depth_kernel_0_falls_back_to_the_per_layer_kernels(gen, monkeypatch):
    monkeypatch.setattr(fused, "enabled", lambda: True)
    assert gen._best_depth_path() == "kernel"
    monkeypatch.setenv("PARLEY_DEPTH_KERNEL", "0")
    assert gen._best_depth_path() == "fused"
    with pytest.raises(ValueError, match="step kernel"):
        gen.depth_path = "kernel"
    monkeypatch.setenv("PARLEY_FUSED", "0")
    monkeypatch.setattr(fused, "enabled", lambda: False)
    assert gen._best_depth_path() == "mlx"


def test_the_cpu_runs_the_depth_transformer_on_mlx_operations(gen):
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("a CPU-only check")
    assert gen.depth_path == "mlx" and gen.fused is False
    with pytest.raises(ValueError):
        gen.depth_path = "kernel"
    with pytest.raises(ValueError):
        gen.depth_path = "sideways"


def test_the_barrier_state_starts_clear():
    b = depth_kernel.new_barrier()
    assert b.dtype == mx.uint32 and b.size == 4
    assert depth_kernel.barrier_failed(b) is False


@cuda
def test_on_cuda_the_depth_step_kernel_gives_the_frames_of_the_mlx_operations(tiny_dir):
    """float32 tiny model, greedy: a session's tokens with one kernel a depth step equal those of
    the per-layer kernels and of plain MLX operations; no grid barrier gave up."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    rng = np.random.default_rng(2)
    pcm = (0.1 * rng.standard_normal((12, 1920))).astype(np.float32)
    runs = []
    for path in ("kernel", "fused", "mlx"):
        engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32")
        assert engine.gen.depth_path == "kernel"
        engine.gen.depth_path = path
        engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
        runs.append([engine.step(p).tokens.copy() for p in pcm])
        assert not engine.gen.model.depformer.step_kernel_failed()
    for a, b, c in zip(*runs):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_the_frame_path_and_the_bench_name_the_depth_path(tiny_dir, monkeypatch, capsys):
    import json

    from engine.bench import BenchResult
    from tui.cli import main
    from engine.duplex import DuplexEngine
    assert main(["bench", "--model", str(tiny_dir), "--frames", "2", "--warmup", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["depth_path"] == ("kernel" if fused.enabled() else "mlx")
    on_cuda = fused.enabled()  # all four are CUDA defaults (sampled frames: the draws)
    assert data["ring_attention"] is data["one_kernel_draws"] is data["early_submit"] is on_cuda
    assert data["temporal_kernel"] is on_cuda
    lines = BenchResult({**data, "depth_path": "kernel", "temporal_fused": True}).summary_lines()
    assert "Depth transformer: one CUDA kernel a step; temporal: fused CUDA kernels" in lines
    lines = BenchResult({**data, "depth_path": "kernel", "temporal_fused": True, "ring_attention": True,
                         "one_kernel_draws": True, "early_submit": True}).summary_lines()
    assert ("Depth transformer: one CUDA kernel a step; temporal: fused CUDA kernels with ring "
            "attention; top-k draws: one CUDA kernel each; stages submitted as built") in lines
    monkeypatch.setattr(fused, "enabled", lambda: True)
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "0")  # the default on a GPU
    monkeypatch.setenv("PARLEY_PRESUBMIT", "0")
    engine = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32")
    engine.overlap_encode = False
    assert engine.gen.depth_path == "kernel"
    assert engine.frame_path == "depth one kernel a step, temporal step kernel, one-kernel draws"
    engine.gen.model.temporal.step_kernel = False
    assert engine.frame_path == ("depth one kernel a step, temporal fused + ring attention, "
                                 "one-kernel draws")
    engine.gen.depth_path = "fused"
    engine.gen.model.temporal.ring_attention = False
    engine.gen.early_submit = True
    assert engine.frame_path == "depth fused, temporal fused, one-kernel draws, stages submitted early"
    monkeypatch.setenv("PARLEY_FUSED_SAMPLING", "0")
    assert engine.frame_path == "depth fused, temporal fused, stages submitted early"
    engine.gen.presubmit = True
    assert engine.frame_path == ("depth fused, temporal fused, stages submitted early, "
                                 "next temporal step submitted ahead")


def test_the_barrier_kind_is_a_template_switch(gen, monkeypatch):
    """PARLEY_DEPTH_BARRIER=acqrel (experimental) builds the kernel with acquire/release
    barriers; anything else keeps the fence-based ones."""
    calls = []
    _stand_in(monkeypatch, calls)
    hn = mx.zeros((1, 1, gen.cfg.dim), dtype=mx.float32)
    dep = gen.model.depformer
    try:
        for value in ("acqrel", "fences"):
            monkeypatch.setenv("PARLEY_DEPTH_BARRIER", value)
            dep.step_kernel(0, hn, mx.array(1, dtype=mx.int32), [])
        monkeypatch.delenv("PARLEY_DEPTH_BARRIER")
        dep.step_kernel(0, hn, mx.array(1, dtype=mx.int32), [])
    finally:
        depth_kernel._kernel.cache_clear()
    assert [c["t"]["AR"] for c in calls] == [True, False, False]
    assert "grid_sync<AR>" in calls[0]["kw"]["source"]


def _first_step_under(gen, monkeypatch, setting: str, values) -> list[dict]:
    """The stand-in's record of depth step 0's kernel call under each value of a depth_kernel
    setting, in order."""
    calls = []
    _stand_in(monkeypatch, calls)
    hn = mx.zeros((1, 1, gen.cfg.dim), dtype=mx.float32)
    for value in values:
        monkeypatch.setattr(depth_kernel, setting, value)
        gen.model.depformer.step_kernel(0, hn, mx.array(1, dtype=mx.int32), [])
    return calls


def test_the_l2_prefetch_is_a_template_switch(gen, monkeypatch):
    """PARLEY_DEPTH_PREFETCH: a template constant of the step kernel, whose source asks L2 for
    the rows of each product a warp takes (input projection, each layer's four, the head)."""
    calls = _first_step_under(gen, monkeypatch, "PREFETCH", (1, 0))
    assert [c["t"]["PF"] for c in calls] == [True, False]
    src = calls[0]["kw"]["source"]
    body = src[src.index("if constexpr (PF)"):src.index("// Input:")]
    for w in ("win", "p[1]", "p[4]", "p[8]", "p[11]", "hw"):
        assert f"({w}," in body
    assert body.count("p[8]") == 2  # both halves of the gated rows


def test_more_warps_a_block_come_with_launch_bounds(gen, monkeypatch):
    """PARLEY_DEPTH_WARPS=16: blocks of 512 threads (the grid's warps and the template follow),
    declared with launch bounds that cap the registers so that a block fits an SM; 8 keeps the
    kernel as it was."""
    wide, plain = _first_step_under(gen, monkeypatch, "WARPS", (16, 8))
    assert wide["t"]["WARPS"] == 16 and wide["block"][0] == 512
    assert wide["grid"][0] == wide["t"]["NB"] * 512
    bounds = wide["kw"]["header"][wide["kw"]["header"].index("#undef __global__"):]
    assert "__launch_bounds__(512, 1)" in bounds and "namespace" not in bounds  # after all else
    assert plain["t"]["WARPS"] == 8 and plain["block"][0] == 256
    assert "__launch_bounds__" not in plain["kw"]["header"]
    mid = _first_step_under(gen, monkeypatch, "WARPS", (12,))[0]  # 150 registers unbounded
    cap = mid["kw"]["header"][mid["kw"]["header"].index("#undef __global__"):]
    assert "__maxnreg__(128)" in cap and "__launch_bounds__" not in cap and mid["block"][0] == 384


@cuda
@pytest.mark.parametrize("warps", [12, 16])
def test_on_cuda_more_warps_a_block_give_the_frames_of_the_mlx_operations(tiny_dir, monkeypatch,
                                                                          warps):
    """float32 tiny model, greedy: with 12 or 16 warps a depth block the session's tokens equal
    those of plain MLX operations, and no grid barrier gave up."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    pcm = (0.1 * np.random.default_rng(8).standard_normal((8, 1920))).astype(np.float32)
    runs = []
    monkeypatch.setattr(depth_kernel, "WARPS", warps)
    for path in ("kernel", "mlx"):
        engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32")
        engine.gen.depth_path = path
        engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
        runs.append([engine.step(p).tokens.copy() for p in pcm])
        assert not engine.gen.model.depformer.step_kernel_failed()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@cuda
def test_on_cuda_the_depth_prefetch_keeps_the_frames_the_same(tiny_dir, monkeypatch):
    """float32 tiny model, greedy: the same frames with the depth step kernel's L2 prefetch as
    without (a hint), and no grid barrier gave up."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    pcm = (0.1 * np.random.default_rng(7).standard_normal((8, 1920))).astype(np.float32)
    runs = []
    for pf in (1, 0):
        monkeypatch.setattr(depth_kernel, "PREFETCH", pf)
        engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32")
        assert engine.gen.depth_path == "kernel"
        engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
        runs.append([engine.step(p).tokens.copy() for p in pcm])
        assert not engine.gen.model.depformer.step_kernel_failed()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_failed_grid_barrier_falls_back_to_the_per_layer_kernels(gen, monkeypatch):
    dep = gen.model.depformer
    assert gen.check_depth_kernel() is None  # not on the step-kernel path (this CPU)
    monkeypatch.setattr(fused, "enabled", lambda: True)
    gen._depth_path = "kernel"
    dep._barrier = depth_kernel.new_barrier()
    assert gen.check_depth_kernel() is None  # the barrier held
    dep._barrier = mx.array(np.array([3, 7, 1, 0], dtype=np.uint32))  # a wait gave up
    msg = gen.check_depth_kernel()
    assert msg and "per-layer kernels" in msg
    assert gen.depth_path == "fused" and dep._barrier is None
    assert gen.check_depth_kernel() is None  # said once


def test_the_engine_checks_the_step_kernel_and_passes_the_notice_on(tiny_dir, monkeypatch):
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    checks = []

    def check():
        checks.append(engine._frames)
        return "switched" if len(checks) == 2 else None

    monkeypatch.setattr(engine.gen, "check_depth_kernel", check)
    notices = [engine.step(np.zeros(1920, np.float32)).notice for _ in range(60)]
    assert all(n % engine.DEPTH_CHECK_EVERY == 1 for n in checks) and len(checks) >= 2
    assert [n for n in notices if n] == ["switched"]


def test_a_model_notice_becomes_a_session_warning():
    import dataclasses

    from engine.audio import signals as S
    from engine.audio.backends import SimulatedBackend
    from engine.session import EventKind, Session, SessionConfig
    from engine.session.fakes import ToneFrameModel

    class NoticingModel(ToneFrameModel):
        def step(self, *a, **kw):
            res = super().step(*a, **kw)
            if self.total_steps == 5:
                res = dataclasses.replace(res, notice="The depth path changed.")
            return res

    b = SimulatedBackend(input_signal=S.speech_like(3.0, seed=1, level_dbfs=-25), loop_input=True)
    s = Session(NoticingModel(step_ms=30.0, start_s=0.2), b, persona="teacher",
                config=SessionConfig(echo_mode="headphones"), threaded=False)
    s.start()
    b.advance(2.0)
    assert "The depth path changed." in s.snapshot.warnings
    ev = [e for e in s.events.drain() if e.kind == EventKind.WARNING]
    assert any(e.data["code"] == "engine_notice" for e in ev)


def test_the_depth_grid_can_be_set_without_touching_the_temporal_one(gen, monkeypatch):
    """depth_kernel.BLOCKS (PARLEY_DEPTH_BLOCKS) sets the depth step kernel's grid and its
    barrier count, and only that: the temporal step kernel keeps one grid a multiprocessor."""
    from engine.lm import temporal_kernel
    monkeypatch.setattr(depth_kernel, "sm_count", lambda: 132)
    monkeypatch.setattr(depth_kernel, "BLOCKS", 33)
    assert depth_kernel.grid_blocks() == 33
    calls = []
    _stand_in(monkeypatch, calls)
    try:
        dep = gen.model.depformer
        dep.step_kernel(0, mx.zeros((1, 1, gen.model.cfg.dim), dtype=mx.float32),
                        mx.array(5, dtype=mx.int32), [])
    finally:
        depth_kernel._kernel.cache_clear()
    assert calls[0]["grid"][0] == 33 * depth_kernel.WARPS * 32 and calls[0]["t"]["NB"] == 33
    settings = temporal_kernel.launch_settings(gen.model.temporal, mx.float32, gen.kv.slots)
    assert settings["sms"] == 132
    monkeypatch.setattr(depth_kernel, "BLOCKS", 0)
    assert depth_kernel.grid_blocks() == 132


def test_blocks_that_fill_an_sm_keep_the_grid_at_one_an_sm(monkeypatch):
    """Blocks of 16 warps take an SM's whole register file: a grid of more blocks than SMs could
    not be resident at once (its barriers would give up), so PARLEY_DEPTH_BLOCKS is capped; with
    8 warps two blocks share an SM and a larger grid stays as asked."""
    monkeypatch.setattr(depth_kernel, "sm_count", lambda: 132)
    monkeypatch.setattr(depth_kernel, "BLOCKS", 264)
    monkeypatch.setattr(depth_kernel, "WARPS", 16)
    assert depth_kernel.grid_blocks() == 132
    monkeypatch.setattr(depth_kernel, "BLOCKS", 66)
    assert depth_kernel.grid_blocks() == 66
    monkeypatch.setattr(depth_kernel, "BLOCKS", 264)
    monkeypatch.setattr(depth_kernel, "WARPS", 8)
    assert depth_kernel.grid_blocks() == 264


def test_the_default_block_is_16_warps():
    for env, want in ((None, 16), ("", 16), ("8", 8), ("32", 32), ("33", 16), ("0", 16), ("x", 16)):
        assert depth_kernel.warps_from(env) == want
