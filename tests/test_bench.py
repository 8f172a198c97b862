"""`parley bench --json`: the fields issue 8 promises, with real numbers from real frames."""

from __future__ import annotations

import json

from tui.cli import main


def test_bench_json_has_every_field(tiny_dir, capsys):
    code = main(["bench", "--model", str(tiny_dir), "--frames", "6", "--warmup", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["frames"] == 6
    for stage in ("encode", "temporal", "depth", "decode", "total"):
        st = data["stages"][stage]
        assert 0 < st["p50_ms"] <= st["p95_ms"] <= st["max_ms"]
    # The stage split was measured with barriers, the total without: the parts are comparable.
    parts = sum(data["stages"][k]["p50_ms"] for k in ("encode", "temporal", "depth", "decode"))
    assert parts > 0.3 * data["stages"]["total"]["p50_ms"]
    for key in ("rtf", "text_tokens_per_s", "load_s", "prefill_ms", "peak_memory_gb"):
        assert data[key] > 0, key
    assert data["quantize"] is None and data["device"] and data["mlx_version"]
    assert abs(data["rtf"] - (1000 / data["frames_per_s"]) / 80) < 1e-6
    assert data["context"] == "full"
    # Paced frames (at most --frames): the latency from a frame's audio to its output.
    paced = data["paced_latency"]
    assert 0 < paced["p50_ms"] <= paced["p95_ms"] <= paced["max_ms"] < 80
    assert data["presubmit"] is True
    assert data["weight_tables"] is False  # no step kernel on this CPU
    assert data["encode_after_issue"] is False  # no encode worker on this CPU either
    # A persona switch once compiled: the same prefill again, timed.
    assert 0 < data["switch_prefill_ms"] and data["prefill_frames"] > 0


def test_bench_paces_frames_in_real_time_and_follows_the_presubmit_flag(tiny_dir, capsys):
    """--paced-frames N frames one every 80 ms (so at least (N-1) x 80 ms of wall time);
    --no-presubmit builds each temporal step inside its frame; --paced-frames 0: none."""
    import time
    base = ["bench", "--model", str(tiny_dir), "--frames", "4", "--warmup", "1", "--json"]
    t = time.perf_counter()
    assert main(base + ["--paced-frames", "4", "--no-presubmit"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert time.perf_counter() - t >= 3 * 0.080
    assert data["presubmit"] is False and data["paced_latency"]["p50_ms"] > 0
    assert main(base + ["--paced-frames", "0", "--no-switch"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["paced_latency"] is None and data["presubmit"] is True
    assert data["switch_prefill_ms"] is None


def test_bench_times_a_full_or_a_fresh_attention_window(tiny_dir):
    """By default the frames attend over a whole window (the steady state); `--context prompt`
    times them right after the prompt."""
    from engine.bench import run_bench
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona

    engine = DuplexEngine.load(str(tiny_dir), greedy=True)
    persona = Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0")
    kv = engine.gen.kv
    full = run_bench(engine, persona, frames=2, warmup=1, switch=False).data
    assert full["attended_positions"] == kv.slots == kv.filled and full["context"] == "full"
    fresh = run_bench(engine, persona, frames=2, warmup=1, full_context=False, switch=False).data
    assert 0 < fresh["attended_positions"] == kv.filled < kv.slots
    # The persona switch at the end does not change what the frames attended over.
    again = run_bench(engine, persona, frames=2, warmup=1).data
    assert again["attended_positions"] == kv.slots > kv.filled


def test_bench_summary_lines(tiny_dir, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--frames", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "Peak memory:" in out and "Frame: p50" in out and "real-time factor" in out
    assert "Latency at real-time pace: p50" in out and "submitted as each frame ends" in out
    assert "a persona switch after that:" in out
    assert "Depth transformer: MLX operations; temporal: MLX operations" in out  # no CUDA here


def test_live_frames_sample_the_stage_split(tiny_dir):
    import numpy as np

    from engine.duplex import DuplexEngine
    from engine.personas import Persona, TEACHER_PROMPT

    engine = DuplexEngine.load(str(tiny_dir), greedy=True)
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    results = [engine.step(np.zeros(1920, np.float32)) for _ in range(16)]
    split = [r for r in results if "temporal" in r.timings_ms]
    assert len(split) == 2  # one frame in eight pays the per-stage barriers
    for r in split:
        assert set(r.timings_ms) == {"encode", "temporal", "depth", "decode", "total"}
        assert all(v > 0 for v in r.timings_ms.values())
    chosen = {id(r) for r in split}
    assert all(set(r.timings_ms) == {"total"} for r in results if id(r) not in chosen)


def test_bench_says_how_the_frame_ran_and_overlap_follows_the_flag(tiny_dir, capsys):
    """The JSON says whether the encode overlapped and whether the depth step was fused; the
    overlap defaults to on only on CUDA (this CPU: off) and follows --[no-]overlap-encode."""
    from engine.duplex import default_overlap_encode
    base = ["bench", "--model", str(tiny_dir), "--frames", "3", "--warmup", "1", "--json"]
    seen = {}
    for flag in ([], ["--overlap-encode"], ["--no-overlap-encode"]):
        assert main(base + flag) == 0
        data = json.loads(capsys.readouterr().out)
        seen[tuple(flag)] = data["overlap_encode"]
        assert data["fused_depth"] is False  # no CUDA here
        assert data["depth_path"] == "mlx"
        assert data["temporal_fused"] is False
    assert seen == {(): default_overlap_encode(), ("--overlap-encode",): True,
                    ("--no-overlap-encode",): False}
    assert default_overlap_encode() is False


def test_bench_reports_the_model_and_the_ring_beside_the_peak(tiny_dir, capsys):
    """Memory as issue 8 states its targets: what the loaded model holds (at least the LM's own
    weights), the KV ring the conversation adds, and the running peak above both."""
    from engine.bench import BenchResult, run_bench
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona

    engine = DuplexEngine.load(str(tiny_dir), greedy=True)
    data = run_bench(engine, Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"),
                     frames=2, warmup=1).data
    ring = sum(a.nbytes for a in engine.gen.kv.arrays()) / 1e9
    assert abs(data["kv_ring_gb"] - ring) < 1e-12 and ring > 0
    assert engine.lm.nbytes() / 1e9 <= data["model_memory_gb"] < data["peak_memory_gb"]
    assert data["peak_memory_gb"] >= data["model_memory_gb"] + ring
    line = [s for s in BenchResult(data).summary_lines() if s.startswith("Peak memory")][0]
    assert "the model after loading" in line and "the KV ring" in line


def test_bench_names_the_depth_kernels_launch(tiny_dir):
    """On the one-kernel depth path the JSON and the summary say the grid it ran (blocks and
    warps a block, which change its speed); other paths have none."""
    from engine.bench import BenchResult, run_bench
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona

    engine = DuplexEngine.load(str(tiny_dir), greedy=True)
    data = run_bench(engine, Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"),
                     frames=1, warmup=1).data
    assert data["depth_path"] == "mlx" and data["depth_kernel_launch"] is None  # no CUDA here
    data = {**data, "depth_path": "kernel", "depth_kernel_launch": {"blocks": 132, "warps": 16}}
    line = [s for s in BenchResult(data).summary_lines() if s.startswith("Depth transformer")][0]
    assert line.startswith("Depth transformer: one CUDA kernel a step (132 blocks of 16 warps);")
    data = {**data, "temporal_kernel": True,
            "temporal_kernel_launch": {"tensor_core_products": True}}
    line = [s for s in BenchResult(data).summary_lines() if s.startswith("Depth transformer")][0]
    assert "; temporal: CUDA kernels of several layers each (products on the tensor cores)" in line
    assert "chained ahead" not in line  # the CPU's defaults
    data = {**data, "chain_ahead": True, "presubmit": True, "codes_on_device": True,
            "overlap_encode": True}
    line = [s for s in BenchResult(data).summary_lines() if s.startswith("Depth transformer")][0]
    assert "; the next temporal step chained ahead on the device's user codes" in line
    line = [s for s in BenchResult({**data, "overlap_encode": False}).summary_lines()
            if s.startswith("Depth transformer")][0]
    assert line.endswith("; the next temporal step chained ahead")
