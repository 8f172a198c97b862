"""engine/lm/temporal_kernel.py: what the temporal step kernel is given, how the engine takes it
and leaves it.

The kernel needs MLX's CUDA backend: on a CUDA machine the test marked `cuda` runs the tiny model
through it; `scripts/check_fused_kernels.py --temporal-kernel` checks it there against the fused
step on a 7B-shaped model, and `--nvrtc` compiles every variant anywhere. Here the kernels are
stood in for.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.lm import fused, temporal_kernel
from tests.test_fused import _greedy_tokens, cuda


def _stand_in(monkeypatch, calls: list) -> None:
    """mx.fast.cuda_kernel replaced: each call is checked against the kernel's declaration and
    answered with zeros of the declared output shapes; the temporal kernel's calls are recorded."""

    def fake_cuda_kernel(**kw):
        def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None):
            assert len(inputs) == len(kw["input_names"]), kw["name"]
            assert len(output_shapes) == len(kw["output_names"]) == len(output_dtypes)
            outs = [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
            if kw["name"].startswith("parley_temporal_"):
                calls.append({"kw": kw, "t": dict(template or []),
                              "inputs": dict(zip(kw["input_names"], inputs)),
                              "outs": dict(zip(kw["output_names"], outs)),
                              "grid": grid, "block": threadgroup})
            return outs
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    fused._kernel.cache_clear()
    temporal_kernel._kernel.cache_clear()


def _rings(kv) -> list[list[mx.array]]:
    """The ring's kernel inputs as step() takes them: keys, values, key params, value params."""
    arrays, n = kv.kernel_inputs(), kv.num_layers
    return [arrays[i * n:(i + 1) * n] for i in range(4)]


@pytest.fixture
def engine(tiny_dir, monkeypatch):
    from engine.duplex import DuplexEngine
    monkeypatch.setattr(fused, "enabled", lambda: True)
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "1")
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "0")
    yield DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32")
    temporal_kernel._kernel.cache_clear()
    fused._kernel.cache_clear()


def test_it_is_the_default_where_it_runs_and_can_be_turned_off(tiny_dir, monkeypatch):
    from engine.duplex import DuplexEngine
    monkeypatch.setattr(fused, "enabled", lambda: True)
    monkeypatch.delenv("PARLEY_TEMPORAL_KERNEL", raising=False)
    temporal = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen.model.temporal
    assert temporal.ring_attention and temporal.step_kernel
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "0")
    temporal = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen.model.temporal
    assert temporal.ring_attention and not temporal.step_kernel
    monkeypatch.delenv("PARLEY_TEMPORAL_KERNEL")
    monkeypatch.setenv("PARLEY_RING_ATTENTION", "0")  # the kernel is the ring path's next step
    temporal = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen.model.temporal
    assert not temporal.step_kernel
    monkeypatch.setattr(fused, "enabled", lambda: False)  # no CUDA: neither
    monkeypatch.delenv("PARLEY_RING_ATTENTION")
    temporal = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen.model.temporal
    assert not temporal.ring_attention and not temporal.step_kernel


def test_it_takes_the_tiny_model_and_refuses_mixed_layouts(engine):
    temporal = engine.gen.model.temporal
    assert temporal.step_kernel
    hd = engine.gen.cfg.dim // engine.gen.cfg.num_heads
    assert temporal_kernel.supports(temporal, mx.float32, hd)
    assert not temporal_kernel.supports(temporal, mx.float16, hd)
    assert not temporal_kernel.supports(temporal, mx.float32, 96)  # heads ring_item cannot take
    lin = temporal.layers[0].out_proj
    q, s, b = mx.quantize(lin.weight, group_size=32, bits=4)
    from engine.lm.layers import Linear
    temporal.layers[0].out_proj = Linear(q, s, b, 4, 32)  # one layer quantized: refused
    assert not temporal_kernel.supports(temporal, mx.float32, hd)


def test_each_launch_gets_its_layers_rings_and_the_stream_of_the_last(engine, monkeypatch):
    """Layers split over launches of LAYERS_PER_LAUNCH; each launch gets x from the previous
    one, each layer's own arrays and rings, the step's position, ring meta, counters and barrier;
    only the last one's output (the out_norm) is the step's."""
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    n = len(temporal.layers)
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 1)
    calls = []
    _stand_in(monkeypatch, calls)
    x = mx.zeros((1, 1, cfg.dim))
    offset, meta = mx.array(7, dtype=mx.int32), kv.step_meta()
    barrier = temporal._barrier_state()
    out = temporal_kernel.step(temporal, x, offset, meta, kv.counters(), barrier,
                               *_rings(kv))
    assert len(calls) == n
    for i, c in enumerate(calls):
        ins, t = c["inputs"], c["t"]
        assert t["L"] == 1 and t["LAST"] == (i == n - 1)
        assert t["D"] == cfg.dim and t["H"] == cfg.num_heads and t["S"] == kv.slots
        assert t["C"] * t["CL"] >= kv.slots and t["NB"] * t["WARPS"] * 32 == c["grid"][0]
        assert t["XS"] >= t["CL"] + t["WARPS"] * t["HD"]
        layer = temporal.layers[i]
        assert ins["n1_0"] is layer.norm1 and ins["n2_0"] is layer.norm2
        assert ins["wq_0"] is layer.in_proj.weight and ins["wd_0"] is layer.linear_out.weight
        assert ins["kr_0"] is kv.keys[i] and ins["vr_0"] is kv.values[i]
        assert ins["meta"] is meta and ins["sync"] is barrier and ins["out_norm"] is temporal.out_norm
        assert int(ins["pos"].item()) == 7
        if i:
            assert ins["x0"] is calls[i - 1]["outs"]["x"]
        assert c["outs"]["part"].size == cfg.num_heads * t["C"] * (t["HD"] + 2)
    assert out.shape == (1, 1, cfg.dim)
    assert calls[-1]["outs"]["y"].shape == (cfg.dim,)


def test_more_blocks_an_sm_bound_the_registers_and_widen_the_grid(engine, monkeypatch):
    """BLOCKS_PER_SM > 1: the grid has that many blocks an SM (its barrier counts them all) and
    the kernel is declared with launch bounds that let them fit; LOADS reaches the template."""
    from engine.lm import depth_kernel
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    monkeypatch.setattr(depth_kernel, "sm_count", lambda: 10)
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: 228 * 1024)
    sources = {}
    for bps, loads in ((1, 0), (2, 8), (3, 4)):
        monkeypatch.setattr(temporal_kernel, "BLOCKS_PER_SM", bps)
        monkeypatch.setattr(temporal_kernel, "LOADS", loads)
        calls = []
        _stand_in(monkeypatch, calls)
        temporal_kernel.step(temporal, mx.zeros((1, 1, cfg.dim)), mx.array(3, dtype=mx.int32),
                             kv.step_meta(), kv.counters(), temporal._barrier_state(),
                             *_rings(kv))
        c = calls[0]
        assert c["t"]["NB"] == 10 * bps and c["grid"][0] == 10 * bps * c["block"][0]
        assert c["t"]["LOADS"] == loads and c["t"]["PROBE"] is False
        sources[bps] = c["kw"]["header"]
    assert "__launch_bounds__" not in sources[1]
    assert c["t"]["PF"] == temporal_kernel.PREFETCH
    bounds = sources[3][sources[3].index("#undef __global__"):]
    assert "__launch_bounds__(256, 3)" in bounds and "namespace" not in bounds  # after all else


def test_blocks_an_sm_are_as_many_as_its_shared_memory_holds(monkeypatch):
    from engine.lm import depth_kernel
    block = 46 * 1024  # the 7B's: the down projection's staged input
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: 228 * 1024)  # H100/H200
    assert temporal_kernel.blocks_that_fit(3, block) == 3
    assert temporal_kernel.blocks_that_fit(1, block) == 1
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: 100 * 1024)  # Ada
    assert temporal_kernel.blocks_that_fit(3, block) == 2
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: None)  # the driver cannot say
    assert temporal_kernel.blocks_that_fit(3, block) == 1


def test_the_l2_prefetch_mask_reaches_the_kernel_and_retraces_the_step(engine, monkeypatch):
    """PARLEY_TEMPORAL_PREFETCH: the mask is a template constant of every launch, the kernel
    source asks L2 for what each of the five prefetches names, and the engine's compiled step is
    traced again when the mask changes (a trace holds its launches)."""
    from engine.lm import depth_kernel
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    src = temporal_kernel._BODY
    for bit in (temporal_kernel.PF_RING, temporal_kernel.PF_OUT, temporal_kernel.PF_GATED,
                temporal_kernel.PF_DOWN, temporal_kernel.PF_NEXT_QKV):
        assert f"(PF & {bit}) != 0" in src
    assert "cp.async.bulk.prefetch.L2.global" in depth_kernel._HELPERS
    seen = []
    for pf in (0, 31):
        monkeypatch.setattr(temporal_kernel, "PREFETCH", pf)
        calls = []
        _stand_in(monkeypatch, calls)
        temporal_kernel.step(temporal, mx.zeros((1, 1, cfg.dim)), mx.array(3, dtype=mx.int32),
                             kv.step_meta(), kv.counters(), temporal._barrier_state(),
                             *_rings(kv))
        assert {c["t"]["PF"] for c in calls} == {pf}
        seen.append(temporal._kernel_step())
    assert seen[0] is not seen[1]


def test_the_probe_returns_each_launchs_clock_ticks(engine, monkeypatch):
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 1)
    calls = []
    _stand_in(monkeypatch, calls)
    out, ticks = temporal_kernel.step(temporal, mx.zeros((1, 1, cfg.dim)), mx.array(3, dtype=mx.int32),
                                      kv.step_meta(), kv.counters(), temporal._barrier_state(),
                                      *_rings(kv), probe=True)
    assert out.shape == (1, 1, cfg.dim) and len(ticks) == len(temporal.layers) == len(calls)
    for c, t in zip(calls, ticks):
        assert c["t"]["PROBE"] is True and t is c["outs"]["ticks"]
        assert t.shape == (1 + 5 * c["t"]["L"],) and t.dtype == mx.uint64


def test_the_engine_step_runs_it_and_the_warm_up_leaves_the_ring_alone(engine, monkeypatch):
    """A live temporal step is one compiled call of the kernel step (traced by the warm-up) at
    the ring's slot, and advances the ring; the warm-up evaluates the kernel at slot -1, which
    writes no ring slot."""
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    calls, metas = [], []
    _stand_in(monkeypatch, calls)
    real = temporal._kernel_step

    def spied():
        fn = real()
        return lambda x, offset, meta, *rest: (metas.append(np.array(meta).tolist()),
                                               fn(x, offset, meta, *rest))[1]

    monkeypatch.setattr(temporal, "_kernel_step", spied)
    outs = temporal.warm_up(mx.zeros((1, 1, cfg.dim)), kv)
    mx.eval(outs)
    assert metas == [[-1, 1]]  # traced here, the kernels made once each launch
    assert len(calls) == -(-len(temporal.layers) // temporal_kernel.LAYERS_PER_LAUNCH)
    calls.clear()
    end = kv.end
    h = gen.model.hidden(mx.zeros((1, 1, cfg.dim)), kv, compiled=True)
    mx.eval(h)
    assert kv.end == end + 1 and h.shape == (1, 1, cfg.dim)
    assert calls == []  # the traced step replayed: no Python call of the kernels
    assert metas[1:] == [[end % kv.slots, min(end + 1, kv.slots)]]


def test_a_barrier_that_gave_up_switches_it_off_with_a_sentence(engine):
    gen = engine.gen
    temporal = gen.model.temporal
    assert gen.check_depth_kernel() is None  # no barrier state yet: nothing failed
    temporal._barrier = mx.array([0, 0, 1, 0], dtype=mx.uint32)
    notice = gen.check_depth_kernel()
    assert notice and "temporal transformer" in notice and notice.count(".") == 1
    assert not temporal.step_kernel and temporal._barrier is None
    assert engine.frame_path.count("temporal fused + ring attention") == 1


def test_the_frame_path_and_the_bench_name_it(engine, tiny_dir, capsys):
    import json

    from engine.bench import BenchResult
    from tui.cli import main
    assert "temporal step kernel" in engine.frame_path
    fused._kernel.cache_clear()
    with pytest.MonkeyPatch.context() as mp:  # the bench on this CPU, as it runs here
        mp.setattr(fused, "enabled", lambda: False)
        assert main(["bench", "--model", str(tiny_dir), "--frames", "2", "--warmup", "1",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["temporal_kernel"] is False and data["temporal_kernel_launch"] is None
    from engine.lm import depth_kernel
    gen = engine.gen
    for smem, blocks in ((None, 1), (228 * 1024, temporal_kernel.BLOCKS_PER_SM)):
        with pytest.MonkeyPatch.context() as mp:  # what an SM holds: unknown, an H100/H200's
            mp.setattr(depth_kernel, "shared_memory_per_sm", lambda: smem)
            launch = temporal_kernel.launch_settings(gen.model.temporal, gen.model.dtype,
                                                     gen.kv.slots)
        assert launch["layers_per_launch"] == temporal_kernel.LAYERS_PER_LAUNCH
        assert launch["blocks_per_sm"] == blocks
        assert launch["loads_in_flight"] == temporal_kernel.LOADS
    lines = BenchResult({**data, "temporal_fused": True, "ring_attention": True,
                         "temporal_kernel": True}).summary_lines()
    assert any("; temporal: CUDA kernels of several layers each" in line for line in lines)
    assert not any("ring attention" in line for line in lines)


@cuda
def test_on_cuda_the_step_kernel_keeps_the_frames_the_same(tiny_dir, monkeypatch):
    """float32 tiny model, greedy: frames through the temporal step kernel equal those of the
    fused step with ring attention, while the ring fills and across a wrap."""
    pcm = (0.1 * np.random.default_rng(4).standard_normal((12, 1920))).astype(np.float32)
    k_engine, k_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_TEMPORAL_KERNEL": "1"},
                                        pcm, wrap_after=6)
    r_engine, r_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_TEMPORAL_KERNEL": "0"},
                                        pcm, wrap_after=6)
    assert k_engine.gen.model.temporal.step_kernel
    assert not r_engine.gen.model.temporal.step_kernel
    assert not k_engine.gen.model.temporal.step_kernel_failed()
    for a, b in zip(k_tokens, r_tokens):
        np.testing.assert_array_equal(a, b)
    # Each launch handed over as built (PARLEY_SPLIT_SUBMIT=1): the same frames.
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 1)
    s_engine, s_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_TEMPORAL_KERNEL": "1",
                                                                "PARLEY_SPLIT_SUBMIT": "1"},
                                        pcm, wrap_after=6)
    assert s_engine.gen.model.temporal.split_submit
    for a, b in zip(s_tokens, r_tokens):
        np.testing.assert_array_equal(a, b)


def _step_at_slot_4(temporal, kv, x, keys, **kw) -> tuple[np.ndarray, list[np.ndarray]]:
    """One kernel step at position 4 over copies of `keys` (values: keys + 1) -> (output, the
    key rings after it) as numpy."""
    rings = [k + 0 for k in keys]
    out = temporal_kernel.step(temporal, x, mx.array(4, dtype=mx.int32),
                               mx.array([4, 5], dtype=mx.int32), kv.counters(),
                               temporal._barrier_state(), rings, [r + 1 for r in rings],
                               *_rings(kv)[2:], **kw)
    mx.eval(out, rings)
    return np.array(out), [np.array(r) for r in rings]


@cuda
def test_on_cuda_launch_configurations_agree_bit_for_bit(tiny_dir, monkeypatch):
    """Blocks an SM, loads in flight and L2 prefetches change who computes what, not the sums:
    the step's output and rings are the same bits under each configuration."""
    from engine.duplex import DuplexEngine
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "1")
    gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    x = mx.random.normal((1, 1, cfg.dim), key=mx.random.key(1))
    keys = [mx.random.normal(k.shape, key=mx.random.key(i)) for i, k in enumerate(kv.keys)]
    results = []
    # the last with every L2 prefetch on (hints: no value may change)
    for bps, loads, pf in ((1, 0, 0), (2, 8, 0), (2, 2, 0), (3, 4, 31)):
        monkeypatch.setattr(temporal_kernel, "BLOCKS_PER_SM", bps)
        monkeypatch.setattr(temporal_kernel, "LOADS", loads)
        monkeypatch.setattr(temporal_kernel, "PREFETCH", pf)
        results.append(_step_at_slot_4(temporal, kv, x, keys))
    assert not temporal.step_kernel_failed()
    for out, rings in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        for a, b in zip(rings, results[0][1]):
            np.testing.assert_array_equal(a, b)


def test_split_submission_hands_each_launch_over_as_built(engine, monkeypatch):
    """PARLEY_SPLIT_SUBMIT=1: the live step calls the launches uncompiled, with mx.async_eval on
    each launch's output but the last's (the caller submits that one), in launch order, and the
    launches are those of the compiled step (the same inputs, the ring's slot)."""
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 1)
    calls, submitted = [], []
    _stand_in(monkeypatch, calls)
    real_async = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (submitted.append((len(calls), a)),
                                                      real_async(*a)))
    temporal.split_submit = True
    end = kv.end
    h = gen.model.hidden(mx.zeros((1, 1, cfg.dim)), kv, compiled=True)
    mx.eval(h)
    n = len(temporal.layers)
    assert len(calls) == n and kv.end == end + 1
    # after launch i (1-based) is built, its output goes to the device; the last one's is h
    assert [i for i, _ in submitted] == list(range(1, n))
    for i, (_, args) in enumerate(submitted):
        assert args[0] is not None and args[0].shape == (cfg.dim,)
    meta = np.array(calls[0]["inputs"]["meta"]).tolist()
    assert meta == [end % kv.slots, min(end + 1, kv.slots)]
    keys = _rings(kv)[0]
    for i, c in enumerate(calls):
        assert c["t"]["L"] == 1 and c["t"]["LAST"] == (i == n - 1)
        assert any(v is keys[i] for v in c["inputs"].values())


def test_split_submission_is_opt_in(tiny_dir, monkeypatch):
    from engine.lm.temporal import Temporal
    monkeypatch.delenv("PARLEY_SPLIT_SUBMIT", raising=False)
    assert not Temporal([], mx.ones((4,)), 1, 8, 10000.0).split_submit
    monkeypatch.setenv("PARLEY_SPLIT_SUBMIT", "1")
    assert Temporal([], mx.ones((4,)), 1, 8, 10000.0).split_submit


def test_weight_tables_stand_for_each_launchs_weights(engine, monkeypatch):
    """PARLEY_WEIGHT_TABLE=1: each launch takes one table (a capture kernel's uint64 output over
    its layers' weights, in the kernel's order, evaluated before the step is traced) and its
    layers' rings; the arrays the table points at are held."""
    gen = engine.gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    n = len(temporal.layers)
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 2)
    calls, captures = [], []
    _stand_in(monkeypatch, calls)
    stand_in = mx.fast.cuda_kernel

    def recording(**kw):
        call = stand_in(**kw)
        if kw["name"].startswith("parley_weight_table_"):
            def capture(**c):
                captures.append((kw, c["inputs"]))
                return call(**c)
            return capture
        return call
    monkeypatch.setattr(mx.fast, "cuda_kernel", recording)
    temporal_kernel._capture_kernel.cache_clear()
    temporal.weight_tables = True
    end = kv.end
    h = gen.model.hidden(mx.zeros((1, 1, cfg.dim)), kv, compiled=True)
    mx.eval(h)
    assert kv.end == end + 1
    tables = temporal.weight_tables_for(mx.float32)
    assert len(captures) == len(tables.tables) == -(-n // 2) == len(calls)
    for g, ((kw, ws), c) in enumerate(zip(captures, calls)):
        layers = temporal.layers[2 * g: 2 * g + 2]
        want = [a for layer in layers for a in temporal_kernel._layer_weights(layer, mx.float32)]
        assert len(ws) == len(want) == temporal_kernel._WEIGHTS * len(layers)
        for a, b in zip(ws, want):
            np.testing.assert_array_equal(np.array(a), np.array(b))
        assert tables.held[g] is ws or all(x is y for x, y in zip(tables.held[g], ws))
        ins = c["inputs"]
        assert ins["wtab"] is tables.tables[g] and ins["wtab"].dtype == mx.uint64
        assert len(ins) == 7 + 4 * len(layers)
        # (traced: the rings are the compiled step's arguments, not the ring's arrays)
        assert "wq_0" not in ins and ins["kr_0"].shape == kv.keys[2 * g].shape
        assert "wtab[i]" in c["kw"]["source"]
    # off: the weights are inputs again (a trace of its own)
    temporal.weight_tables = False
    calls.clear()
    mx.eval(gen.model.hidden(mx.zeros((1, 1, cfg.dim)), kv, compiled=True))
    assert calls and all("wtab" not in c["inputs"] and "wq_0" in c["inputs"] for c in calls)
    temporal_kernel._capture_kernel.cache_clear()


def test_weight_tables_are_the_default_and_can_be_turned_off(monkeypatch):
    from engine.lm.temporal import Temporal
    monkeypatch.delenv("PARLEY_WEIGHT_TABLE", raising=False)
    assert Temporal([], mx.ones((4,)), 1, 8, 10000.0).weight_tables
    monkeypatch.setenv("PARLEY_WEIGHT_TABLE", "0")
    assert not Temporal([], mx.ones((4,)), 1, 8, 10000.0).weight_tables


@cuda
def test_on_cuda_weight_tables_give_the_same_bits_and_frames(tiny_dir, monkeypatch):
    """The step through weight tables reads the same weights as the step that takes them as
    inputs: the same output and ring bits; and greedy frames through the engine agree."""
    from engine.duplex import DuplexEngine
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "1")
    monkeypatch.setattr(temporal_kernel, "LAYERS_PER_LAUNCH", 1)  # a table each launch
    gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen
    temporal, kv, cfg = gen.model.temporal, gen.kv, gen.cfg
    x = mx.random.normal((1, 1, cfg.dim), key=mx.random.key(2))
    keys = [mx.random.normal(k.shape, key=mx.random.key(10 + i)) for i, k in enumerate(kv.keys)]
    temporal.weight_tables = True
    tables = temporal.weight_tables_for(mx.float32)
    assert len(tables.tables) == len(temporal.layers)
    results = []
    for t in (None, tables):
        results.append(_step_at_slot_4(temporal, kv, x, keys, tables=t))
    assert not temporal.step_kernel_failed()
    np.testing.assert_array_equal(results[1][0], results[0][0])
    assert np.abs(results[0][0]).sum() > 0
    for a, b in zip(results[1][1], results[0][1]):
        np.testing.assert_array_equal(a, b)
    pcm = (0.1 * np.random.default_rng(5).standard_normal((10, 1920))).astype(np.float32)
    t_engine, t_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_WEIGHT_TABLE": "1"},
                                        pcm, wrap_after=5)
    assert t_engine.gen.model.temporal.weight_tables and t_engine.gen.model.temporal._tables
    r_engine, r_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_WEIGHT_TABLE": "0"},
                                        pcm, wrap_after=5)
    assert not r_engine.gen.model.temporal._tables
    for a, b in zip(t_tokens, r_tokens):
        np.testing.assert_array_equal(a, b)


@cuda
def test_on_cuda_l2_prefetches_keep_the_frames_the_same(tiny_dir, monkeypatch):
    """float32 tiny model over an 8-bit KV ring (whose row parameters the ring prefetch also
    asks for; the tiny widths cannot all be quantized alike, so the weights stay float32 here and
    scripts/check_fused_kernels.py compares 4-bit 7B launches bit for bit), greedy, across a
    wrap: every L2 prefetch on gives the same frames as none."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "1")
    pcm = (0.1 * np.random.default_rng(6).standard_normal((10, 1920))).astype(np.float32)
    runs = []
    for pf in (0, 31):
        monkeypatch.setattr(temporal_kernel, "PREFETCH", pf)
        engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32",
                                   kv_bits=8)
        assert engine.gen.model.temporal.step_kernel and engine.gen.kv.keys[0].dtype == mx.uint8
        engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
        tokens = []
        for i, p in enumerate(pcm):
            if i == 5:
                engine.gen.kv.end = 2 * engine.gen.kv.slots - 3
            tokens.append(engine.step(p).tokens.copy())
        assert not engine.gen.model.temporal.step_kernel_failed()
        runs.append(tokens)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def _shaped(d: int, hidden: int, heads: int, layers: int, dtype, bits: int, weights=None):
    """A Temporal of the given widths (scripts/check_fused_kernels.py's, zero weights unless
    `weights(n, k)` makes each Linear)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from check_fused_kernels import shaped_temporal
    return shaped_temporal({"d": d, "hidden": hidden, "heads": heads}, bits, dtype, layers, weights)


def _kernel_call(t, dtype, slots: int = 16):
    """One step of `t` through temporal_kernel.step over zero rings of `slots` slots."""
    d = int(t.layers[0].out_proj.weight.shape[0])
    H = t.num_heads
    ring = mx.zeros((1, H, slots, d // H), dtype=dtype)
    dummy = mx.zeros((1,), dtype=mx.float32)
    n = len(t.layers)
    return temporal_kernel.step(t, mx.zeros((1, 1, d), dtype=dtype), mx.array(3, dtype=mx.int32),
                                mx.array([3, 4], dtype=mx.int32), mx.zeros((H,), dtype=mx.uint32),
                                mx.zeros((4,), dtype=mx.uint32), [ring] * n, [ring] * n,
                                [dummy] * n, [dummy] * n)


def test_tensor_core_products_fit_4_and_8_bit_bf16_widths_of_8_slices():
    fits = temporal_kernel.mma_fits
    assert fits(mx.bfloat16, 4, 64, 4096, 11264)  # the 7B's
    assert fits(mx.bfloat16, 4, 64, 1024, 2048)
    assert not fits(mx.float32, 4, 64, 4096, 11264)  # x must be bf16 values
    assert fits(mx.bfloat16, 8, 64, 4096, 11264)  # a byte as two nibble planes
    assert not fits(mx.bfloat16, 2, 64, 4096, 11264)
    assert not fits(mx.bfloat16, 0, 0, 4096, 11264)
    assert not fits(mx.bfloat16, 4, 32, 4096, 11264)  # a pair of groups is one 4-byte load
    assert not fits(mx.bfloat16, 4, 64, 4096, 11264 + 64)  # 8 slices of steps of 128
    assert not fits(mx.bfloat16, 4, 64, 512, 1024)


def test_tensor_core_products_are_an_opt_in_template_switch(monkeypatch):
    """PARLEY_TEMPORAL_MMA: a template constant set only where the products fit (4- and 8-bit
    bf16 models of 7B-like widths here, not one with bf16 weights), with the steps a lane loads
    ahead and a staged input with room for the pairs; the kernel's source holds the tensor-core
    path and the settings say which ran."""
    from engine.lm import depth_kernel
    monkeypatch.setattr(depth_kernel, "sm_count", lambda: 4)
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: 228 * 1024)
    wide = _shaped(1024, 2048, 8, 2, mx.bfloat16, 4)
    eight = _shaped(1024, 2048, 8, 2, mx.bfloat16, 8)
    plain = _shaped(1024, 2048, 8, 2, mx.bfloat16, 0)
    seen = {}
    for mma in (False, True):
        monkeypatch.setattr(temporal_kernel, "MMA", mma)
        for name, t in (("4-bit", wide), ("8-bit", eight), ("bf16", plain)):
            calls = []
            _stand_in(monkeypatch, calls)
            _kernel_call(t, mx.bfloat16)
            seen[(mma, name)] = calls[0]["t"]["MMA"]
            if seen[(mma, name)]:  # x pairs (16 bytes a weight word) and group sums fit
                bits = 4 if name == "4-bit" else 8
                assert calls[0]["t"]["XS"] >= 4 * 2048 * bits // 32 + 2048 // 64
            assert calls[0]["t"]["MU"] == temporal_kernel.MMA_STEPS
            assert temporal_kernel.launch_settings(t, mx.bfloat16, 16)["tensor_core_products"] \
                is seen[(mma, name)]
    assert seen == {(False, "4-bit"): False, (False, "8-bit"): False, (False, "bf16"): False,
                    (True, "4-bit"): True, (True, "8-bit"): True, (True, "bf16"): False}
    header = calls[0]["kw"]["header"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in header
    assert "if constexpr (MMA)" in calls[0]["kw"]["source"]


def test_by_default_the_tensor_cores_take_4_bit_products_only(monkeypatch):
    """MMA None (PARLEY_TEMPORAL_MMA unset): tensor-core products for 4-bit weights, where the
    H200 ran them faster (session 14), CUDA-core products at 8 bits, where they were slower."""
    from engine.lm import depth_kernel
    monkeypatch.setattr(depth_kernel, "sm_count", lambda: 4)
    monkeypatch.setattr(depth_kernel, "shared_memory_per_sm", lambda: 228 * 1024)
    monkeypatch.setattr(temporal_kernel, "MMA", None)
    used = {}
    for bits in (4, 8, 0):
        calls = []
        _stand_in(monkeypatch, calls)
        _kernel_call(_shaped(1024, 2048, 8, 2, mx.bfloat16, bits), mx.bfloat16)
        used[bits] = calls[0]["t"]["MMA"]
    assert used == {4: True, 8: False, 0: False}


def test_the_environment_sets_the_products():
    assert [temporal_kernel.mma_from(v) for v in ("", "0", "1", " 1", "yes")] == [
        None, False, True, True, None]


def test_the_engine_traces_its_step_again_when_the_products_change(engine, monkeypatch):
    temporal = engine.gen.model.temporal
    monkeypatch.setattr(temporal_kernel, "MMA", False)
    before = temporal._kernel_step()
    monkeypatch.setattr(temporal_kernel, "MMA", True)
    assert temporal._kernel_step() is not before


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_on_cuda_tensor_core_products_give_the_fused_steps_values(monkeypatch, bits):
    """A 4- or 8-bit bf16 temporal of random weights (widths the tensor-core products take): the
    step kernel with them comes within bf16 rounding of the fused step (MLX's quantized layout,
    fused kernels a layer), output and the ring slot it writes, and no barrier gave up."""
    import math

    from engine.lm import depth_kernel
    from engine.lm.layers import Linear
    keys = iter(range(100, 400))

    def weights(n, k):
        w = (mx.random.normal((n, k), key=mx.random.key(next(keys))) / math.sqrt(k))
        q, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=bits)
        return Linear(q, s, b, bits, 64)

    t = _shaped(1024, 2048, 8, 2, mx.bfloat16, bits, weights)
    t.use_fused = t.ring_attention = True
    mx.eval(t.arrays())
    whole = t._whole_step()
    S, H, hd = 16, 8, 128
    ring0 = [mx.random.normal((1, H, S, hd), key=mx.random.key(i)).astype(mx.bfloat16)
             for i in range(4)]
    dummy = [mx.zeros((1,), dtype=mx.float32)] * 4
    x = mx.random.normal((1, 1, 1024), key=mx.random.key(9)).astype(mx.bfloat16)
    offset, meta = mx.array(5, dtype=mx.int32), mx.array([5, 6], dtype=mx.int32)
    counters = mx.zeros((H,), dtype=mx.uint32)
    ra = [r + 0 for r in ring0]
    want = whole(x, offset, meta, counters, *ra, *dummy)
    mx.eval(want, ra)
    monkeypatch.setattr(temporal_kernel, "MMA", True)
    barrier = depth_kernel.new_barrier()
    rb = [r + 0 for r in ring0]
    got = temporal_kernel.step(t, x, offset, meta, counters, barrier, rb[:2], rb[2:], dummy[:2],
                               dummy[2:])
    mx.eval(got, rb)
    assert not depth_kernel.barrier_failed(barrier)

    def rel(a, b):
        a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-9))

    assert rel(got, want) < 2e-2
    for a, b in zip(ra, rb):
        assert rel(a[:, :, 5], b[:, :, 5]) < 2e-2
        np.testing.assert_array_equal(np.array(a[:, :, :5].astype(mx.float32)),
                                      np.array(b[:, :, :5].astype(mx.float32)))
