"""Facts about this machine that the doctor, the dashboard and the benchmark report.

Everything here is cheap and never raises: a fact that cannot be read is None.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass

from engine.config import LMConfig, MimiConfig

GB = 1024**3


def total_memory_bytes() -> int | None:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out and out.isdigit() else None
    info = _meminfo()
    return info.get("MemTotal")


def available_memory_bytes() -> int | None:
    """Memory a new process can use without swapping (Linux MemAvailable; macOS free+inactive)."""
    if sys.platform == "darwin":
        out = _run(["vm_stat"])
        if not out:
            return None
        page = 4096
        m = re.search(r"page size of (\d+) bytes", out)
        if m:
            page = int(m.group(1))
        pages = 0
        for key in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
            m = re.search(rf"{key}:\s+(\d+)", out)
            if m:
                pages += int(m.group(1))
        return pages * page
    return _meminfo().get("MemAvailable")


def process_rss_bytes() -> int | None:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # best effort: the peak
    except Exception:
        return None


def peak_rss_bytes() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:
        return None


def memory_pressure() -> str | None:
    """macOS memory pressure level ("normal", "warn", "critical"); None elsewhere."""
    if sys.platform != "darwin":
        return None
    out = _run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"])
    return {"1": "normal", "2": "warn", "4": "critical"}.get((out or "").strip())


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return values


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class MlxInfo:
    version: str | None
    default_device: str | None
    gpu_backend: str | None  # "metal", "cuda" or None
    error: str | None = None


def mlx_info() -> MlxInfo:
    try:
        import mlx.core as mx
    except Exception as exc:  # ImportError, or a broken native library
        return MlxInfo(None, None, None, error=f"{type(exc).__name__}: {exc}")
    backend = None
    try:
        if mx.metal.is_available():
            backend = "metal"
    except Exception:
        pass
    if backend is None:
        try:
            if mx.cuda.is_available():
                backend = "cuda"
        except Exception:
            pass
    return MlxInfo(getattr(mx, "__version__", None), str(mx.default_device()), backend)


def platform_summary() -> str:
    machine = platform.machine()
    if sys.platform == "darwin":
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or machine
        return f"macOS {platform.mac_ver()[0]} ({chip})"
    return f"{platform.system()} {platform.release()} ({machine}, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# How much memory a model needs (MODEL.md §3.5, §4.4, §12).


def lm_parameter_counts(cfg: LMConfig, depformer_steps: int | None = None) -> dict[str, int]:
    """Parameters by group: 'linear' (quantizable matrices) and 'dense' (embeddings, heads, norms).

    `depformer_steps` is how many depth steps are loaded (8 for live PersonaPlex, MODEL.md §4.3).
    """
    d, h, L = cfg.dim, cfg.hidden_size, cfg.num_layers
    D, hd, Ld = cfg.depformer_dim, cfg.depformer_hidden_size, cfg.depformer_num_layers
    K = depformer_steps or cfg.dep_q
    V, C, Q = cfg.text_card, cfg.card, cfg.n_q
    temporal = L * (4 * d * d + 3 * h * d)
    depformer = Ld * K * (4 * D * D + 3 * hd * D) + K * D * d
    dense = ((V + 1) * d + V * d + Q * (C + 1) * d + d + 2 * L * d  # embeddings, head, norms
             + (V + 1) * D + (K - 1) * (C + 1) * D + K * C * D + 2 * Ld * D)
    return {"linear": temporal + depformer, "dense": dense}


def mimi_parameter_bytes(cfg: MimiConfig, bf16_transformers: bool = False) -> int:
    """fp32 Mimi weights plus codebooks (~0.36 GB full size), estimated from the config; with
    `bf16_transformers` the transformers' matrices in bf16 (~0.26 GB)."""
    s, q, t = cfg.seanet, cfg.quantizer, cfg.transformer
    conv = 0
    ch = s.n_filters
    for _ in s.ratios:  # encoder and decoder stages: residual block + (transposed) conv
        conv += 2 * (ch * (ch // s.compress) * s.residual_kernel_size + (ch // s.compress) * ch
                     + 2 * ch * ch * 2 * 4)
        ch *= 2
    conv += 2 * (ch * s.dimension * s.kernel_size)
    matrices = 4 * t.d_model * t.d_model + 2 * t.d_model * t.dim_feedforward
    transformer = 2 * t.num_layers * (matrices + 6 * t.d_model)
    quant = q.n_q * q.bins * (q.dimension + 1) + 4 * q.dimension * q.input_dimension
    resample = 2 * t.d_model * t.d_model * 4
    saved = 2 * (2 * t.num_layers * matrices) if bf16_transformers else 0
    return 4 * (conv + transformer + quant + resample) - saved


def estimate_model_bytes(lm: LMConfig, mimi: MimiConfig, bits: int | None,
                         group_size: int = 64, depformer_steps: int | None = 8,
                         kv_bits: int | None | str = "auto", quantize_tables: bool = True) -> int:
    """Resident bytes for weights (bf16, or `bits`-bit quantized linears, and with
    `quantize_tables` embeddings and heads too), KV ring (bf16, or 8-bit rows with a float32
    scale and low each: kv_bits "auto" is 8 with quantized weights) and Mimi (its transformers'
    matrices in bf16 with quantized weights, as DuplexEngine.load does by default)."""
    counts = lm_parameter_counts(lm, depformer_steps)

    def quantized(n: int) -> int:
        return n * bits // 8 + n // group_size * 4

    linear = counts["linear"] * 2 if bits is None else quantized(counts["linear"])
    dense = counts["dense"] * 2 if bits is None or not quantize_tables else quantized(counts["dense"])
    if kv_bits == "auto":
        kv_bits = 8 if bits else None
    rows = 2 * lm.num_layers * lm.context * lm.num_heads  # key and value rows of the ring
    head_dim = lm.dim // lm.num_heads
    kv = rows * (head_dim + 8) if kv_bits == 8 else rows * head_dim * 2
    return linear + dense + kv + mimi_parameter_bytes(mimi, bf16_transformers=bits is not None)
