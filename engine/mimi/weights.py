"""Mimi checkpoint naming, validation, loading and random test weights.

Keys and shapes follow the published PyTorch checkpoint
(`tokenizer-e351c8d8-checkpoint125.safetensors`, MODEL.md §10.2): fused attention weights
(`self_attn.in_proj_weight`), conv weights [out, in, k], transposed-conv weights [in, out, k].
The layout conversion to MLX happens in the modules that consume the weights (conv.py,
transformer.py, quantizer.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.config import MimiConfig
from engine.errors import CheckpointError

_REST_LEVEL = re.compile(r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.")
_INITIALIZED = "._codebook._initialized"


# ---------------------------------------------------------------------------------------------
# Layout: which SEANet index holds which layer.


def encoder_layout(cfg: MimiConfig) -> list[dict]:
    """The SEANet encoder's convolutions in order, with their `encoder.model.{i}` indices."""
    s = cfg.seanet
    nf, layers, idx, mult = s.n_filters, [], 0, 1
    layers.append(dict(kind="conv", idx=idx, cin=s.channels, cout=mult * nf, k=s.kernel_size))
    idx += 1
    for ratio in reversed(s.ratios):
        dim = mult * nf
        for j in range(s.n_residual_layers):
            layers.append(dict(kind="res", idx=idx, dim=dim, hidden=dim // s.compress,
                               k=s.residual_kernel_size, dilation=s.dilation_base ** j))
            idx += 1
        idx += 1  # ELU
        layers.append(dict(kind="conv", idx=idx, cin=dim, cout=2 * dim, k=2 * ratio,
                           stride=ratio, elu_before=True))
        idx += 1
        mult *= 2
    idx += 1  # ELU
    layers.append(dict(kind="conv", idx=idx, cin=mult * nf, cout=s.dimension,
                       k=s.last_kernel_size, elu_before=True))
    return layers


def decoder_layout(cfg: MimiConfig) -> list[dict]:
    """The SEANet decoder's layers in order, with their `decoder.model.{i}` indices."""
    s = cfg.seanet
    nf, layers, idx = s.n_filters, [], 0
    mult = 2 ** len(s.ratios)
    layers.append(dict(kind="conv", idx=idx, cin=s.dimension, cout=mult * nf, k=s.kernel_size))
    idx += 1
    for ratio in s.ratios:
        idx += 1  # ELU
        dim = mult * nf
        layers.append(dict(kind="convtr", idx=idx, cin=dim, cout=dim // 2, k=2 * ratio,
                           stride=ratio, elu_before=True))
        idx += 1
        for j in range(s.n_residual_layers):
            layers.append(dict(kind="res", idx=idx, dim=dim // 2, hidden=(dim // 2) // s.compress,
                               k=s.residual_kernel_size, dilation=s.dilation_base ** j))
            idx += 1
        mult //= 2
    idx += 1  # ELU
    layers.append(dict(kind="conv", idx=idx, cin=nf, cout=s.channels, k=s.last_kernel_size,
                       elu_before=True))
    return layers


def expected_mimi_shapes(cfg: MimiConfig, n_q_stored: int | None = None) -> dict[str, tuple]:
    """Every tensor of a Mimi checkpoint (PyTorch naming) and its shape, for `n_q_stored` levels.

    The `_initialized` flags are included; the loader tolerates their absence.
    """
    n_q = cfg.quantizer.n_q if n_q_stored is None else n_q_stored
    shapes: dict[str, tuple] = {}

    def conv(prefix, cout, cin, k):
        shapes[f"{prefix}.weight"] = (cout, cin, k)
        shapes[f"{prefix}.bias"] = (cout,)

    for side, layout in (("encoder", encoder_layout(cfg)), ("decoder", decoder_layout(cfg))):
        for L in layout:
            base = f"{side}.model.{L['idx']}"
            if L["kind"] == "conv":
                conv(f"{base}.conv.conv", L["cout"], L["cin"], L["k"])
            elif L["kind"] == "convtr":
                shapes[f"{base}.convtr.convtr.weight"] = (L["cin"], L["cout"], L["k"])
                shapes[f"{base}.convtr.convtr.bias"] = (L["cout"],)
            else:
                conv(f"{base}.block.1.conv.conv", L["hidden"], L["dim"], L["k"])
                conv(f"{base}.block.3.conv.conv", L["dim"], L["hidden"], 1)

    t = cfg.transformer
    D, F = t.d_model, t.dim_feedforward
    for side in ("encoder", "decoder"):
        for i in range(t.num_layers):
            p = f"{side}_transformer.transformer.layers.{i}"
            shapes[f"{p}.self_attn.in_proj_weight"] = (3 * D, D)
            shapes[f"{p}.self_attn.out_proj.weight"] = (D, D)
            shapes[f"{p}.linear1.weight"] = (F, D)
            shapes[f"{p}.linear2.weight"] = (D, F)
            for n in ("norm1", "norm2"):
                shapes[f"{p}.{n}.weight"] = (D,)
                shapes[f"{p}.{n}.bias"] = (D,)
            shapes[f"{p}.layer_scale_1.scale"] = (D,)
            shapes[f"{p}.layer_scale_2.scale"] = (D,)

    k = 2 * cfg.downsample_stride
    shapes["downsample.conv.conv.conv.weight"] = (D, D, k)
    shapes["upsample.convtr.convtr.convtr.weight"] = (D, 1, k)

    q = cfg.quantizer
    for branch, levels in (("rvq_first", 1), ("rvq_rest", n_q - 1)):
        p = f"quantizer.{branch}"
        shapes[f"{p}.input_proj.weight"] = (q.dimension, q.input_dimension, 1)
        shapes[f"{p}.output_proj.weight"] = (q.output_dimension, q.dimension, 1)
        for i in range(levels):
            cb = f"{p}.vq.layers.{i}._codebook"
            shapes[f"{cb}.embedding_sum"] = (q.bins, q.dimension)
            shapes[f"{cb}.cluster_usage"] = (q.bins,)
            shapes[f"{cb}._initialized"] = (1,)
    return shapes


def stored_levels(keys) -> int:
    """How many quantizer levels a checkpoint stores: 1 semantic + the acoustic levels found."""
    found = [int(m.group(1)) for k in keys if (m := _REST_LEVEL.match(k))]
    return 1 + (max(found) + 1 if found else 0)


def validate_mimi_weights(weights: dict, cfg: MimiConfig,
                          source: str = "the Mimi checkpoint") -> int:
    """Checks keys and shapes against the configuration; returns the stored level count.

    Raises CheckpointError naming the first missing, unexpected or mis-shaped tensor.
    """
    n_q = stored_levels(weights.keys())
    if n_q < 2:
        raise CheckpointError(
            f"{source} has no acoustic quantizer levels "
            "('quantizer.rvq_rest.vq.layers.0._codebook.embedding_sum' is missing).")
    expected = expected_mimi_shapes(cfg, n_q)
    # Shapes first: with a checkpoint made for another configuration they are the telling error.
    for key, shape in expected.items():
        if key in weights and tuple(weights[key].shape) != shape:
            raise CheckpointError(
                f"{source} tensor '{key}' has shape {list(weights[key].shape)}, "
                f"but the configured Mimi expects {list(shape)}.")
    missing = sorted(k for k in expected if k not in weights and not k.endswith(_INITIALIZED))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source} lacks tensor '{missing[0]}'{more}; "
                              "it does not match the configured Mimi architecture.")
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source} has unexpected tensor '{unexpected[0]}'{more}; "
                              "it does not match the configured Mimi architecture.")
    return n_q


def read_mimi_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file into float32 numpy arrays (fp16/bf16 are widened)."""
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"the Mimi checkpoint {path} does not exist.")
    try:
        raw = mx.load(str(path), format="safetensors")
    except Exception:  # mx raises ValueError/RuntimeError with low-level text
        raise CheckpointError(f"{path} is not a readable safetensors file; "
                              "re-download the Mimi checkpoint.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file.")
    out = {}
    for key, arr in raw.items():
        if not mx.issubdtype(arr.dtype, mx.floating):
            raise CheckpointError(f"{path} tensor '{key}' has dtype {arr.dtype}; "
                                  "Mimi weights must be floating point.")
        out[key] = np.array(arr.astype(mx.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Random weights for tests (REFERENCE.md §4.2, §4.3, §8).


def speech_like(num_samples: int, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like test signal (float32, peak 0.3): a harmonic voice with a gliding
    pitch, syllable-rate amplitude modulation, moving spectral tilt and noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    x = sum((0.6 / k) * np.sin(k * phase) * (1 + 0.8 * np.sin(2 * np.pi * (3 + 0.5 * k) * t))
            for k in range(1, 12))
    x = x * 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    x = x + 0.05 * rng.standard_normal(num_samples) * (np.sin(2 * np.pi * 1.3 * t) > 0.6)
    peak = np.abs(x).max()
    return (0.3 * x / (peak if peak > 0 else 1.0)).astype(np.float32)


def random_mimi_weights(cfg: MimiConfig, seed: int, n_q_stored: int | None = None,
                        fit_pcm: np.ndarray | None = None, num_codebooks: int = 8,
                        out_peak: float | None = 0.5) -> dict[str, np.ndarray]:
    """Random Mimi weights in the real key naming, with an initialization that makes the codec
    depend on its input (REFERENCE.md §4.2).

    * conv/linear weights N(0, 1/fan_in), conv biases N(0, 0.01²);
    * LayerNorm weight U(0.5, 1.5), bias N(0, 0.1²); LayerScale U(0.5, 1.5);
    * codebooks: with `fit_pcm` (float32 mono at the codec's rate), each level's centroids are
      Gaussian draws from the per-dimension mean/std of that level's residuals over the clip
      (REFERENCE.md §4.3), so the codes vary; without it, N(0, 1) centroids. `cluster_usage` is
      U(0.5, 1.5) and `embedding_sum` = centroid × usage;
    * with `fit_pcm` and `out_peak`, the last decoder conv is scaled so that decoding the clip's
      codes peaks at about `out_peak`.

    Deterministic for a given (cfg, seed, n_q_stored, fit_pcm). Full size takes a few seconds
    without fitting (≈385 MB of float32).
    """
    rng = np.random.default_rng(seed)
    n_q = cfg.quantizer.n_q if n_q_stored is None else n_q_stored
    shapes = expected_mimi_shapes(cfg, n_q)
    w: dict[str, np.ndarray] = {}

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def uniform(shape, lo, hi):
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    for key, shape in shapes.items():
        if key.endswith("_codebook._initialized"):
            w[key] = np.ones(shape, dtype=np.float32)
        elif "_codebook." in key:
            continue  # filled below
        elif key.endswith("layer_scale_1.scale") or key.endswith("layer_scale_2.scale"):
            w[key] = uniform(shape, 0.5, 1.5)
        elif re.search(r"\.norm[12]\.weight$", key):
            w[key] = uniform(shape, 0.5, 1.5)
        elif re.search(r"\.norm[12]\.bias$", key):
            w[key] = normal(shape, 0.1)
        elif key.endswith(".bias"):
            w[key] = normal(shape, 0.01)
        elif ".convtr." in key:  # [in, out/groups, k] with k = 2·stride: 2 input steps per output
            cin, out_per_group, k = shape
            per_step = 1 if (out_per_group == 1 and key.startswith("upsample.")) else cin
            w[key] = normal(shape, (1.0 / (2 * per_step)) ** 0.5)
        else:  # conv [out, in, k] or linear [out, in]
            fan_in = int(np.prod(shape[1:]))
            w[key] = normal(shape, (1.0 / fan_in) ** 0.5)

    q = cfg.quantizer
    levels = {"rvq_first": 1, "rvq_rest": n_q - 1}

    def set_level(branch, i, centroids):
        usage = uniform((q.bins,), 0.5, 1.5)
        cb = f"quantizer.{branch}.vq.layers.{i}._codebook"
        w[f"{cb}.cluster_usage"] = usage
        w[f"{cb}.embedding_sum"] = (centroids.astype(np.float32) * usage[:, None]).astype(
            np.float32)

    if fit_pcm is None:
        for branch, n in levels.items():
            for i in range(n):
                set_level(branch, i, normal((q.bins, q.dimension), 1.0))
        return w

    # Fit the codebooks to the residuals of the clip's latent, level by level.
    from engine.mimi.codec import Mimi
    from engine.mimi.quantizer import codebook_vectors

    for branch, n in levels.items():  # placeholders so the encoder can be built
        for i in range(n):
            set_level(branch, i, np.zeros((q.bins, q.dimension), dtype=np.float32))
    probe = Mimi.from_weights(w, cfg, num_codebooks=min(num_codebooks, n_q), validate=False)
    latent = np.asarray(probe.encode_latent(fit_pcm), dtype=np.float32)  # [F, D]
    for branch, n in levels.items():
        proj = w[f"quantizer.{branch}.input_proj.weight"][:, :, 0]
        residual = (latent @ proj.T).astype(np.float32)
        for i in range(n):
            mean = residual.mean(axis=0)
            std = residual.std(axis=0) + 1e-6
            centroids = (mean + std * rng.standard_normal((q.bins, q.dimension))).astype(np.float32)
            set_level(branch, i, centroids)
            cb = f"quantizer.{branch}.vq.layers.{i}._codebook"
            c = codebook_vectors(w[f"{cb}.embedding_sum"], w[f"{cb}.cluster_usage"])
            diff = residual[:, None, :].astype(np.float64) - c[None].astype(np.float64)
            d = (diff ** 2).sum(-1)
            residual = (residual - c[d.argmin(axis=1)]).astype(np.float32)

    if out_peak:
        probe = Mimi.from_weights(w, cfg, num_codebooks=min(num_codebooks, n_q), validate=False)
        pcm = np.asarray(probe.decode(probe.encode(fit_pcm)))
        peak = float(np.abs(pcm).max())
        if peak > 0:
            last = decoder_layout(cfg)[-1]["idx"]
            for suffix in ("weight", "bias"):
                key = f"decoder.model.{last}.conv.conv.{suffix}"
                w[key] = (w[key] * np.float32(out_peak / peak)).astype(np.float32)
    return w
