#!/usr/bin/env bash
# The GPU comparison of issue 8, on the lent H100 (see ../shared/spec/GPU.md). Not a unit test.
#
# Prepare here: bash ../shared/tools/gpu-wheels.sh (MLX's CUDA build in .gpu/a + .gpu/b) and the
# wheels the GPU machine lacks in .whl/ (moshi==0.2.13, soundfile, cffi, pycparser, samplerate,
# pytest and its dependencies, sentencepiece). The py-spy wheel for the `pyspy` phase goes in
# .spy/ (it does not fit in one call beside .gpu/a or .gpu/b: 64 MiB a call).
# Then two device calls in a row on the same warm machine (one call cannot carry everything):
#   1. carry [".gpu/a"]:          bash scripts/bench_gpu.sh stage
#   2. carry [".gpu/b", ".whl"]:  bash scripts/bench_gpu.sh run [extra parley bench args]
#      installs MLX's CUDA build and the wheels, times the PyTorch reference's LMGen.step (CUDA
#      graphs on), runs `parley bench` on a 7B-shaped random model at 4 and 8 bits, and prints both
#      engines' figures with the ratio (reference p50 / ours p50). Takes ~5 minutes of device
#      time (each `parley bench` process loads the 7B and JIT-compiles its prefill, ~1-2 min).
# Variables for `run`: BITS (default "4 8"), FRAMES (200), EXTRA (extra 4-bit runs, see below).
# Session 10's frame pipeline (pre-submission, chain ahead, deferred encode, split submission):
# `pipeline` (CUDA checks, reference + 4-bit bench with paced latency, timeline), ~5 minutes.
# Other second calls: `parts` (scripts/bench_frame_parts.py, DISPATCH=1 adds
# scripts/bench_mlx_dispatch.py), `explore` (dispatch costs, then 4-bit frames under each of
# ENVS), `variants` (MLX's CUDA graph settings).
set -euo pipefail
phase=${1:-}
shift || true
mkdir -p "${OUT:-/tmp/out}"
out=${OUT:-/tmp/out}
# The second call of a pair: reassembles and installs MLX's CUDA build and the extra wheels.
install() {
  cp .gpu/b/part_ab /root/gpu/
  ( cd /root/gpu && cat part_aa part_ab > "$(cat cuda.name)" && md5sum -c --quiet cuda.md5 \
    && python3 -m pip install -q --no-index --no-deps --target /root/site mlx-*.whl "$(cat cuda.name)" )
  python3 -m pip install -q --no-index --no-deps --target /root/site-extra .whl/*.whl
  export PYTHONPATH=/root/site:/root/site-extra:$PWD PYTHONUNBUFFERED=1
}

# Each timeline variant's host returns and device marks, from $out/timeline.json.
timeline_summary() {
  python3 - "$out/timeline.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict):
        print(k, {e: v[e] for e in v if "returned" in e or "[gpu]" in e})
PY
}

case "$phase" in
  stage)
    mkdir -p /root/gpu && cp .gpu/a/* /root/gpu/ && ls -la /root/gpu
    ;;
  stage-spy)
    # Before `pyspy`, on the same warm machine: carry [".spy"] (pip download py-spy --no-deps).
    mkdir -p /root/gpu && cp .spy/py_spy-*.whl /root/gpu/ && ls -la /root/gpu
    ;;
  run)
    install
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    PYTHONPATH=/root/site-extra python3 scripts/bench_gpu_reference.py 200 \
      | tee /root/reference.json "$out/reference.json"
    python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
    for bits in ${BITS:-4 8}; do
      python3 -m tui.cli bench --shape personaplex-7b --random-weights --quantize "$bits" \
        --frames ${FRAMES:-200} --json "$@" | tee "$out/parley-q$bits.json"
    done
    # KV16=1: one more 4-bit run with the KV ring in bf16 (the default with quantized weights is
    # the 8-bit ring), for the memory and time it costs.
    if [ -n "${KV16:-}" ]; then
      python3 -m tui.cli bench --shape personaplex-7b --random-weights --quantize 4 --kv-bits 16 \
        --frames ${FRAMES:-200} --json "$@" | tee "$out/parley-q4-kv16.json"
    fi
    # TIMELINE=1: then scripts/frame_timeline.py (when each stage is issued and done).
    if [ -n "${TIMELINE:-}" ]; then
      timeout ${TIMELINE_TIMEOUT:-200} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-40} \
        --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || true
    fi
    # EXTRA="PARLEY_FUSED_TEMPORAL=0 PARLEY_FUSED_TEMPORAL=0,PARLEY_GEMV_LOADS=16": one more
    # 4-bit run per entry (commas join variables), on the same machine as the runs above.
    for env in ${EXTRA:-}; do
      env ${env//,/ } python3 -m tui.cli bench --shape personaplex-7b --random-weights --quantize 4 \
        --frames ${FRAMES:-200} "$@" | grep -E "Frame|Stages|Depth|Latency|Peak" | sed "s/^/[$env] /"
    done
    python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
ref = json.loads(pathlib.Path("/root/reference.json").read_text())
print(f"reference LMGen.step: p50 {ref['p50_ms']:.2f} ms, p95 {ref['p95_ms']:.2f} ms, peak {ref['peak_gb']:.1f} GiB ({ref['gpu']}, torch {ref['torch']})")
for bits in (4, 8, "4-kv16"):
    if not (out / f"parley-q{bits}.json").exists():
        continue
    d = json.loads((out / f"parley-q{bits}.json").read_text())
    st = d["stages"]
    split = ", ".join(f"{k} {st[k]['p50_ms']:.2f}" for k in ("encode", "temporal", "depth", "decode"))
    tot = st["total"]["p50_ms"]
    if d.get("switch_prefill_ms") is not None:
        print(f"parley {bits}-bit prefill: {d['prefill_ms']:.0f} ms first (with JIT), {d['switch_prefill_ms']:.0f} ms on a persona switch")
    if d.get("paced_latency"):
        print(f"parley {bits}-bit at real-time pace: latency p50 {d['paced_latency']['p50_ms']:.2f} ms, p95 {d['paced_latency']['p95_ms']:.2f} ms (presubmit {d.get('presubmit')})")
    print(f"parley {bits}-bit full frame: p50 {tot:.2f} ms, p95 {st['total']['p95_ms']:.2f} ms ({split}); "
          f"peak {d['peak_memory_gb']:.2f} GB (model {d.get('model_memory_gb', 0):.2f}, ring {d.get('kv_ring_gb', 0):.2f} at {d.get('kv_bits') or 16} bits); depth {d.get('depth_path')}, temporal fused {d.get('temporal_fused')}; ratio reference/parley {ref['p50_ms'] / tot:.2f}")
PY
    ;;
  variants)
    # MLX's CUDA backend replays kernels as CUDA graphs of up to MLX_MAX_OPS_PER_BUFFER nodes,
    # keeping MLX_CUDA_GRAPH_CACHE_SIZE of them; a frame has thousands of kernels, so both matter.
    install
    python3 scripts/profile_frame_graph.py
    for env in "MLX_CUDA_GRAPH_CACHE_SIZE=100" "MLX_CUDA_GRAPH_CACHE_SIZE=4000" \
               "MLX_CUDA_GRAPH_CACHE_SIZE=4000 MLX_MAX_OPS_PER_BUFFER=100" \
               "MLX_CUDA_GRAPH_CACHE_SIZE=4000 MLX_MAX_OPS_PER_BUFFER=200"; do
      echo "== $env"
      env $env python3 -m tui.cli bench --shape personaplex-7b --random-weights --quantize 4 \
        --frames 100 "$@" | grep -E "Frame|Stages|Peak|Prefill"
    done
    ;;
  explore)
    # Per-primitive dispatch costs, then whole 4-bit frames under each of ENVS (space-separated;
    # commas inside one entry separate variables), one process each since MLX reads them once.
    # Run right after `stage`, carrying [".gpu/b", ".whl"].
    install
    python3 scripts/bench_mlx_dispatch.py --n 200 --reps 3 | tee -a "$out/dispatch.txt"
    for env in ${ENVS:-"MLX_CUDA_GRAPH_CACHE_SIZE=4000"}; do
      echo "== $env" | tee -a "$out/frames.txt"
      env ${env//,/ } timeout ${BENCH_TIMEOUT:-400} python3 -m tui.cli bench --shape personaplex-7b \
        --random-weights --quantize 4 --frames ${FRAMES:-60} "$@" 2>&1 \
        | tee -a "$out/frames.txt" | grep -E "Frame|Stages|Peak|Prefill|Load|rror" || true
    done
    ;;
  parts)
    # Where a frame's time goes (scripts/bench_frame_parts.py), right after `stage`.
    install
    [ -n "${DISPATCH:-}" ] && python3 scripts/bench_mlx_dispatch.py --n 200 --reps 3 | tee "$out/dispatch.txt"
    python3 scripts/profile_frame_graph.py --by-kind | tee "$out/profile.txt"
    python3 scripts/bench_frame_parts.py "$@" | tee "$out/parts.json"
    ;;
  temporal)
    # The temporal step through MLX operations vs the fused kernels, alone and in whole frames,
    # in one process (scripts/bench_frame_parts.py --temporal). Right after `stage`.
    install
    timeout ${PARTS_TIMEOUT:-540} python3 scripts/bench_frame_parts.py --temporal "$@" | tee "$out/parts.json"
    ;;
  fused)
    # engine/lm/fused.py's kernels against the unfused MLX operations (numerics, then timings),
    # then, if PARTS is set, scripts/bench_frame_parts.py. Right after `stage`.
    install
    python3 scripts/check_fused_kernels.py ${CHECK_ARGS:-} 2>&1 | tee "$out/fused.txt"
    # e.g. PYTEST="tests/test_fused.py tests/test_offline.py": the parity tests through the kernels
    [ -n "${PYTEST:-}" ] && python3 -m pytest -q -p no:cacheprovider $PYTEST 2>&1 | tail -15 \
      | tee "$out/pytest.txt" || true
    [ -n "${PARTS:-}" ] && timeout ${PARTS_TIMEOUT:-420} python3 scripts/bench_frame_parts.py "$@" \
      | tee "$out/parts.json" || true
    ;;
  ncu)
    # Kernel durations from Nsight Compute (scripts/profile_kernels.py: MLX's product, ours, a
    # trivial custom kernel), then the same kernels' wall times in chains. Right after `stage`.
    install
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    PARLEY_UNDER_PROFILER=1 "$ncu" --clock-control none --csv --page raw --print-units base \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active \
      python3 scripts/profile_kernels.py > "$out/ncu.csv" 2> "$out/ncu.err" || tail -5 "$out/ncu.err"
    python3 - "$out/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))]
agg = collections.OrderedDict()
for r in rows[1:]:  # the first row holds the units
    name = r["Kernel Name"][:60]
    agg.setdefault(name, []).append(r)
def num(r, k):
    try:
        return float(r[k].replace(",", ""))
    except (KeyError, ValueError):
        return float("nan")
for name, rs in agg.items():
    d = sum(num(r, "gpu__time_duration.sum") for r in rs) / len(rs)
    b = sum(num(r, "dram__bytes_read.sum") for r in rs) / len(rs)
    r0 = rs[0]
    print(f"{len(rs):3d}x {d / 1e3:8.2f} us  dram {b / 1e6:7.2f} MB  {b / d / 1e3 if d else 0:5.2f} TB/s  "
          f"regs {r0.get('launch__registers_per_thread')} grid {r0.get('launch__grid_size')} "
          f"block {r0.get('launch__block_size')} warps {num(r0, 'sm__warps_active.avg.pct_of_peak_sustained_active'):.0f}%  {name}")
PY
    # Where the depth step kernel's time goes: Nsight Compute's stall reasons and memory report
    # for it alone (the full report in $OUT/ncu-depth.txt).
    PARLEY_UNDER_PROFILER=1 "$ncu" --clock-control none -k regex:parley_depth_step \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section LaunchStats --section Occupancy python3 scripts/profile_kernels.py \
      > "$out/ncu-depth.txt" 2>&1 || true
    grep -iE "duration|stall|warp cycles|throughput|achieved occupancy|registers per|block limit" \
      "$out/ncu-depth.txt" | head -60
    python3 scripts/profile_kernels.py
    ;;
  options)
    # Next session's first call: the top-k sampler kernel's checks, then whole 4-bit frames under
    # each opt-in speed path against the defaults in one process. Right after `stage`.
    install
    timeout ${CHECK_TIMEOUT:-150} python3 scripts/check_fused_kernels.py --sampler 2>&1 | tee "$out/sampler.txt" || true
    timeout ${PARTS_TIMEOUT:-420} python3 scripts/bench_frame_parts.py --options "$@" | tee "$out/options.json"
    ;;
  tkernel)
    # The temporal step kernel (engine/lm/temporal_kernel.py): numerics against the default
    # fused step (CHECK_ARGS=--configs-only skips them), its launch configurations TK_CONFIGS
    # against each other (bit for bit, step time, each phase's time from the kernel's clock), its
    # CUDA tests, then whole 4-bit frames under each of TK_FRAMES against the defaults (FRAMES=0
    # skips them). Configurations: BLOCKS_PER_SM,LOADS[,RING_DPL,RING_CHUNK]. After `stage`.
    install
    timeout ${CHECK_TIMEOUT:-240} python3 scripts/check_fused_kernels.py --temporal-kernel ${CHECK_ARGS:-} \
      --configs ${TK_CONFIGS:-1,0 1,8 2,0 2,8 2,4 3,4} 2>&1 | tee "$out/tkernel.txt" || true
    timeout ${PYTEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider tests/test_temporal_kernel.py 2>&1 | tail -5 || true
    if [ "${FRAMES:-40}" != 0 ]; then
      timeout ${PARTS_TIMEOUT:-300} python3 scripts/bench_frame_parts.py --options --frames ${FRAMES:-40} \
        --variants "temporal step kernel" --tkernel-configs ${TK_FRAMES:-2,4} "$@" | tee "$out/options.json"
    fi
    ;;
  mimi)
    # Mimi's transformer kernels (engine/mimi/transformer_kernel.py): their CUDA tests, numerics
    # against the MLX operations at Mimi's widths across a ring wrap and frame timings, then whole
    # 4-bit frames with them on (the default) and off, interleaved (FRAMES=0 skips). After `stage`.
    install
    timeout ${PYTEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_mimi_kernel.py 2>&1 | tail -5 || true
    timeout ${CHECK_TIMEOUT:-180} python3 scripts/check_fused_kernels.py --mimi 2>&1 | tee "$out/mimi.txt" || true
    if [ "${FRAMES:-40}" != 0 ]; then
      timeout ${PARTS_TIMEOUT:-330} python3 scripts/bench_frame_parts.py --options --frames ${FRAMES:-40} \
        --variants "Mimi kernels off" "$@" | tee "$out/options.json"
    fi
    ;;
  memory)
    # The memory cuts of session 9 (8-bit KV ring, quantized tables, Mimi's transformer weights
    # in bf16): their CUDA tests, the 8-bit ring attention's numerics and timings against the
    # bf16 ring, and the temporal step kernel over an 8-bit ring against the fused step. After
    # `stage`; then `run` (KV16=1) on the same machine for the figures.
    install
    timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider ${PYTEST:-tests/test_kv_ring_8bit.py \
      tests/test_temporal_kernel.py tests/test_fused.py tests/test_depth_kernel.py tests/test_mimi_kernel.py} \
      2>&1 | tail -12 | tee "$out/pytest.txt" || true
    timeout ${RING_TIMEOUT:-120} python3 scripts/check_fused_kernels.py --ring 2>&1 | tee "$out/ring.txt" || true
    timeout ${CHECK_TIMEOUT:-200} python3 scripts/check_fused_kernels.py --temporal-kernel --q8-only \
      --configs 3,4 2>&1 | tee "$out/tkernel.txt" || true
    ;;
  lean)
    # Session 9's memory cuts in one call after `stage` (8-bit KV ring, quantized tables and
    # heads, Mimi's transformer matrices in bf16: the defaults with quantized weights): the 8-bit
    # ring attention's numerics and speed, whole 4-bit frames (time, peak memory), the CUDA tests
    # of the new kernels, then 8-bit frames. Each step has its own time limit.
    install
    [ "${RING_TIMEOUT:-70}" != 0 ] && { timeout ${RING_TIMEOUT:-70} python3 scripts/check_fused_kernels.py --ring 2>&1 \
      | tee "$out/ring.txt" || true; }
    timeout ${PYTEST_TIMEOUT:-130} python3 -m pytest -q -p no:cacheprovider -k on_cuda \
      tests/test_kv_ring_8bit.py tests/test_mimi_kernel.py 2>&1 | tail -8 | tee "$out/pytest.txt" || true
    timeout ${BENCH_TIMEOUT:-230} python3 -m tui.cli bench --shape personaplex-7b --random-weights \
      --quantize 4 --frames ${FRAMES:-100} --json "$@" | tee "$out/parley-q4.json" || true
    [ "${BENCH8_TIMEOUT:-150}" != 0 ] && { timeout ${BENCH8_TIMEOUT:-150} python3 -m tui.cli bench \
      --shape personaplex-7b --random-weights --quantize 8 --frames 60 --json "$@" \
      | tee "$out/parley-q8.json" || true; }
    ;;
  pipeline)
    # Session 10's frame pipeline in one call after `stage`: its CUDA checks (pre-submission,
    # chain ahead and the deferred encode through the kernels; split submission), then the
    # reference and the 4-bit bench (back to back and at real-time pace), then the timeline
    # comparing pre-submission on/off, chain ahead and split submission in one process.
    install
    timeout ${PYTEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider tests/test_presubmit.py \
      tests/test_temporal_kernel.py 2>&1 | tail -6 | tee "$out/pytest.txt" || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    PYTHONPATH=/root/site-extra timeout 120 python3 scripts/bench_gpu_reference.py 200 \
      | tee /root/reference.json "$out/reference.json" | tail -c 300
    timeout ${BENCH_TIMEOUT:-230} python3 -m tui.cli bench --shape personaplex-7b --random-weights \
      --quantize 4 --frames ${FRAMES:-100} --json "$@" > "$out/parley-q4.json" || true
    python3 - "$out" <<'PY' || true
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
ref = json.loads(pathlib.Path("/root/reference.json").read_text())
d = json.loads((out / "parley-q4.json").read_text())
tot, paced = d["stages"]["total"], d.get("paced_latency") or {}
print(f"reference p50 {ref['p50_ms']:.2f} ms; parley 4-bit back to back p50 {tot['p50_ms']:.2f} "
      f"p95 {tot['p95_ms']:.2f}; paced latency p50 {paced.get('p50_ms', 0):.2f} p95 "
      f"{paced.get('p95_ms', 0):.2f}; peak {d['peak_memory_gb']:.3f} GB; ratio {ref['p50_ms'] / tot['p50_ms']:.2f}; "
      f"prefill {d['prefill_ms']:.0f} ms first, {d.get('switch_prefill_ms') or 0:.0f} ms on a persona switch")
PY
    # DEPTH_BLOCKS="66 33": also the depth step kernel over that many blocks (each compiles its
    # own depth kernels first: ~10-30 s more).
    timeout ${TIMELINE_TIMEOUT:-150} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-40} \
      ${DEPTH_BLOCKS:+--depth-blocks $DEPTH_BLOCKS} \
      --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || true
    timeline_summary
    ;;
  nsys|nsys-only)
    # Where the host's ~1.3 ms of issuing a temporal step goes: Nsight Systems over a few
    # timeline frames, MLX's NVTX ranges (one per primitive's eval_gpu) and the CUDA API calls
    # (graph instantiate/update/launch), summed. After `stage`; needs nsys on the machine.
    if [ "$phase" = nsys ]; then install; else export PYTHONPATH=/root/site:/root/site-extra:$PWD PYTHONUNBUFFERED=1; fi
    nsys=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)
    if [ -z "$nsys" ]; then echo "no nsys on this machine"; exit 0; fi
    timeout ${NSYS_TIMEOUT:-300} "$nsys" profile -t cuda,nvtx,osrt -o "$out/frame" --force-overwrite true \
      python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-20} --paced-frames 0 \
      --out "$out/timeline.json" > /dev/null 2> "$out/nsys.err" || tail -5 "$out/nsys.err"
    "$nsys" stats -r nvtx_sum,cuda_api_sum -f csv -o "$out/stats" "$out/frame.nsys-rep" > /dev/null 2>&1 || true
    for f in "$out"/stats*.csv; do echo "== $f"; head -25 "$f"; done
    rm -f "$out/frame.sqlite"
    ;;
  tables)
    # Session 11: what a launch's inputs cost the host (scripts/bench_kernel_inputs.py), the
    # weight tables' CUDA checks, then the timeline with and without them. After `stage`.
    install
    # INPUTS=0 skips the input costs; PYTEST=0 the tests, PYTEST_K filters them; TL_ARGS goes to
    # the timeline, split on spaces (e.g. "--only tables encode": --only takes substrings of
    # variant names, one word each); MLX_USE_CUDA_GRAPHS=0 runs it all without CUDA graphs.
    if [ "${INPUTS:-1}" != 0 ]; then
      timeout ${INPUTS_TIMEOUT:-120} python3 scripts/bench_kernel_inputs.py | tee "$out/kernel_inputs.jsonl" || true
    fi
    if [ "${PYTEST:-1}" != 0 ]; then
      timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_temporal_kernel.py \
        ${PYTEST_K:+-k $PYTEST_K} ${PYTEST_MORE:-} 2>&1 | tail -6 | tee "$out/pytest.txt" || true
    fi
    timeout ${TIMELINE_TIMEOUT:-250} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-40} \
      ${DEPTH_BLOCKS:+--depth-blocks $DEPTH_BLOCKS} ${TL_ARGS:-} \
      --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || tail -3 "$out/timeline.err"
    python3 - "$out/timeline.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict):
        print(k, {e: v[e] for e in v if "returned" in e or "[gpu]" in e})
PY
    ;;
  prefetch)
    # Session 12: the temporal step kernel's L2 prefetches (PARLEY_TEMPORAL_PREFETCH, a mask). One
    # launch of 8 layers at 7B widths over an 8-bit ring under each mask (bit-for-bit check and
    # per-phase clock), the CUDA tests, then the timeline with masks and the depth step
    # kernel's prefetch (PARLEY_DEPTH_PREFETCH). After `stage`.
    # PF_CONFIGS: BLOCKS,LOADS,DPL,CHUNK,MASK entries; PYTEST=0 / TIMELINE=0 skip those parts.
    install
    timeout ${CONFIGS_TIMEOUT:-240} python3 scripts/check_fused_kernels.py --temporal-kernel \
      --configs-only --q8-only --q8-configs --configs ${PF_CONFIGS:-3,4 3,4,0,0,1 3,4,0,0,2 3,4,0,0,4 3,4,0,0,8 3,4,0,0,16 3,4,0,0,27 3,4,0,0,31} \
      2>&1 | tee "$out/prefetch_configs.txt" | grep -v "^ *$" | tail -14 || true
    if [ "${PYTEST:-1}" != 0 ]; then
      timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_temporal_kernel.py \
        tests/test_depth_kernel.py -k "${PYTEST_K:-configurations or prefetch}" 2>&1 | tail -4 | tee "$out/pytest.txt" || true
    fi
    if [ "${TIMELINE:-1}" != 0 ]; then
      timeout ${TIMELINE_TIMEOUT:-250} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-40} \
        --paced-frames ${PACED:-20} --only next_temporal prefetch --prefetch ${TL_PF:-31 27} --depth-prefetch \
        --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || tail -3 "$out/timeline.err"
      timeline_summary
    fi
    ;;
  pyspy)
    # Where each thread's time goes in live frames (session 12's question: what the ~0.6 ms of
    # handing a temporal step over is, with no Nsight Systems on the lent machines): py-spy
    # (staged by `stage-spy`) samples the timeline's frames with native stacks, idle time
    # included, a stack a thread; $out/frames.txt is the collapsed stacks (one line a stack and
    # its count; read it with scripts/pyspy_summary.py). Calls: stage, stage-spy, pyspy.
    install
    python3 -m pip install -q --no-index --no-deps --target /root/site-spy /root/gpu/py_spy-*.whl
    spy=/root/site-spy/bin/py-spy
    timeout ${PYSPY_TIMEOUT:-300} "$spy" record --native --idle --threads --rate ${RATE:-2000} \
      --format raw -o "$out/frames.txt" -- python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-60} \
      --paced-frames ${PACED:-30} --only next_temporal --out "$out/timeline.json" > /dev/null \
      2> "$out/pyspy.err" || tail -5 "$out/pyspy.err"
    timeline_summary
    ls -la "$out"
    ;;
  mma)
    # The temporal kernel's tensor-core products (PARLEY_TEMPORAL_MMA; session 13, the 4-bit default since 14):
    # their CUDA tests (4 and 8 bits), the 7B-width numerics against the fused step over the
    # engine's 8-bit ring, one 8-layer launch without and with them (2, 1 and 3 steps of 128
    # values loaded ahead a lane; phase times from the kernel's clock), then the same at 4 and
    # 8 bits over bf16 rings. ~9 minutes (run it with timeout_s 590). After `stage`. Then, if they
    # are right and faster, the whole frame:
    # PARLEY_TEMPORAL_MMA=1 BITS=4 FRAMES=200 bash scripts/bench_gpu.sh run
    install
    timeout ${PYTEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_temporal_kernel.py \
      -k "tensor_core" > "$out/pytest.txt" 2>&1 || true
    grep -E "passed|failed|Error|^E " "$out/pytest.txt" | head -30 || true
    PARLEY_TEMPORAL_MMA=1 timeout ${CHECK_TIMEOUT:-250} python3 scripts/check_fused_kernels.py \
      --temporal-kernel --q8-only --q8-configs --configs ${MMA_CONFIGS:-3,4 3,4,0,0,0,2 3,4,0,0,0,1 3,4,0,0,0,3} 2>&1 \
      | tee "$out/check-mma.txt" | grep -vE "^\s*$" | tail -30 || true
    # 8-bit weights (two nibble planes) against the CUDA-core products, bf16 rings, 4 and 8 bits.
    timeout ${CHECK8_TIMEOUT:-160} python3 scripts/check_fused_kernels.py --temporal-kernel \
      --configs-only --configs 3,4 3,4,0,0,0,2 2>&1 | tee "$out/check-mma8.txt" \
      | grep -vE "^\s*$" | tail -12 || true
    ;;
  codes)
    # The user codes handed over on the device (PARLEY_CODES_ON_DEVICE; session 13, a CUDA default since 14)
    # with chain ahead: the presubmit tests on the GPU (cross-stream hand-over, token-identical
    # frames), then the timeline's chain-ahead variants (does the next temporal step now start
    # right behind the decode and the encode, ~7.7 ms?; MMA=1 adds the tensor-core products to
    # the defaults and to it) and the encode queued after the frame is issued (at real-time pace
    # the depth chain's submission waited ~1.7 ms behind the worker's Python in this session's
    # timeline), then (RUN=1) the bench with chain ahead and the codes on the device.
    # ~5 minutes. After `stage`.
    install
    # The presubmit cases with the codes on the device (the others ran on the CPU; all eight take
    # ~150 s on the GPU, compiling), and with MMA=1 the tensor-core products' CUDA tests.
    t=tests/test_presubmit.py::test_the_frames_are_those_of_the_step_built_in_its_frame
    timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider "$t[False-True-True-False-True]" \
      "$t[True-True-True-True-True]" \
      ${MMA:+tests/test_temporal_kernel.py::test_on_cuda_tensor_core_products_give_the_fused_steps_values} \
      > "$out/pytest.txt" 2>&1 || true
    grep -E "passed|failed|Error|^E " "$out/pytest.txt" | head -20 || true
    timeout ${TIMELINE_TIMEOUT:-330} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-30} \
      --paced-frames ${PACED:-10} --only chain next_temporal_step_submitted_ahead encode_queued_after ${MMA:+--mma} \
      --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || tail -3 "$out/timeline.err"
    timeline_summary
    if [ -n "${RUN:-}" ]; then
      PARLEY_CHAIN_AHEAD=1 PARLEY_CODES_ON_DEVICE=1 BITS=4 FRAMES=${FRAMES:-200} bash "$0" run
    fi
    ;;
  warps)
    # The depth kernel's 16-warp blocks: the CUDA test with its full report, the 7B-width check
    # against MLX operations, then (RUN=1) the reference and a 4-bit bench with them. After `stage`.
    install
    timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_depth_kernel.py \
      -k "on_cuda" > "$out/pytest.txt" 2>&1 || true
    grep -E "passed|failed|Error|^E " "$out/pytest.txt" | head -40 || true
    PARLEY_DEPTH_WARPS=16 timeout ${CHECK_TIMEOUT:-150} python3 scripts/check_fused_kernels.py \
      --depth-only --no-timings 2>&1 | tee "$out/check16.txt" | tail -15 || true
    if [ -n "${RUN:-}" ]; then
      PARLEY_DEPTH_WARPS=16 BITS=4 FRAMES=${FRAMES:-100} bash "$0" run
    fi
    ;;
  depthgrid)
    # The depth step kernel's grid (session 12's question; 16 warps a block the default since
    # session 13): the CUDA tests of other warp counts, then the timeline with blocks of
    # DEPTH_WARPS (default 8, the old layout; 12 leaves an SM room for the encode's blocks, for
    # the paced latency 16 costs) and, if set, with a grid of DEPTH_BLOCKS (capped at one an SM
    # with blocks of more than 8 warps). Each new depth setting compiles
    # eight kernels first: ~400 s in all. After `stage`.
    install
    if [ "${PYTEST:-1}" != 0 ]; then
      timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_depth_kernel.py \
        -k "warps" 2>&1 | tail -3 | tee "$out/pytest.txt" || true
    fi
    timeout ${TIMELINE_TIMEOUT:-420} python3 scripts/frame_timeline.py --frames ${TIMELINE_FRAMES:-30} \
      --paced-frames ${PACED:-10} --only next_temporal --depth-warps ${DEPTH_WARPS:-8 12} \
      ${DEPTH_BLOCKS:+--depth-blocks $DEPTH_BLOCKS} \
      --out "$out/timeline.json" > /dev/null 2> "$out/timeline.err" || tail -3 "$out/timeline.err"
    timeline_summary
    ;;
  issue)
    # What issuing a custom kernel costs the host by its inputs and template arguments, and
    # whether a pointer table can stand in for the inputs (scripts/bench_kernel_inputs.py);
    # then the nsys phase if Nsight Systems is there. After `stage`.
    install
    timeout ${INPUTS_TIMEOUT:-120} python3 scripts/bench_kernel_inputs.py | tee "$out/kernel_inputs.jsonl" || true
    if [ -n "${NSYS:-1}" ]; then bash "$0" nsys-only; fi
    ;;
  timeline)
    # When the host issues each stage of a live frame and when the device finishes it
    # (scripts/frame_timeline.py: marker kernels read the GPU clock), encode worker on and off.
    install
    timeout ${TIMELINE_TIMEOUT:-400} python3 scripts/frame_timeline.py "$@" | tee "$out/timeline.json"
    ;;
  probe)
    # A short call: the ring attention kernel's check, then Nsight Compute on the depth step
    # kernel alone (stall reasons). Right after `stage`.
    install
    timeout ${RING_TIMEOUT:-100} python3 scripts/check_fused_kernels.py --ring 2>&1 | tee "$out/ring.txt" || true
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    PARLEY_UNDER_PROFILER=1 PARLEY_PROFILE_ONLY=depth timeout ${NCU_TIMEOUT:-120} "$ncu" --clock-control none \
      -k regex:parley_depth_step --section SpeedOfLight --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
      python3 scripts/profile_kernels.py > "$out/ncu-depth.txt" 2>&1 || true
    grep -iE "duration|stall|warp cycles|throughput|achieved occupancy|registers per|block limit" \
      "$out/ncu-depth.txt" | head -60
    ;;
  *)
    echo "usage: bash scripts/bench_gpu.sh stage|stage-spy|run|memory|lean|pipeline|tables|prefetch|pyspy|depthgrid|issue|nsys|timeline|parts|temporal|options|tkernel|mimi|explore|variants|fused|ncu|probe" >&2
    exit 2
    ;;
esac
