#!/usr/bin/env python3
"""Regenerate the PyTorch-reference golden fixtures in tests/fixtures/reference/.

Optional developer step (REFERENCE.md §1-§5, §7.1). Needs a separate virtual environment with
the reference stack, which the project itself never installs:

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0          # the CPU build
    /work/refenv/bin/pip install --no-deps moshi==0.2.13
    /work/refenv/bin/pip install 'numpy<2.3' 'safetensors<0.8' 'einops<0.9' \
        'sentencepiece<0.3' 'sphn<0.3' tqdm 'huggingface-hub<1.0'

Then, from the repository root:

    /work/refenv/bin/python scripts/make_reference_fixtures.py            # (re)write fixtures
    /work/refenv/bin/python scripts/make_reference_fixtures.py --check    # regenerate into a
                                                  # temporary folder and compare bit for bit

Everything is seeded and single-threaded, so two runs give identical bytes. The fixture set and
every array are described in tests/fixtures/reference/README.md.
"""

from __future__ import annotations

import os

# RMSNorm / RoPE / gating are wrapped in a lazy torch.compile; keep it off (REFERENCE.md §3).
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import filecmp  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import wave  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moshi  # noqa: E402
from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402
import moshi.modules.transformer as moshi_transformer  # noqa: E402
from moshi.modules.transformer import LayerScale, StreamingMultiheadAttention  # noqa: E402

THREADS = 1
torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parent.parent
OUT_DEFAULT = REPO / "tests" / "fixtures" / "reference"
SHARED_TINY = REPO.parent / "shared" / "fixtures" / "personaplex-tiny"
FRAME = 1920  # samples per Mimi frame at 24 kHz (12.5 Hz)

REAL_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# Candidate seeds tried for each model family (the one with the best margins is kept).
MIMI_SEEDS = list(range(100, 112))
LM8_SEEDS = list(range(200, 212))
LM16_SEEDS = list(range(300, 312))

# Frame counts.
MIMI_LS1_FRAMES = 48
MIMI_CTX_FRAMES = 40
MIMI_LONG_FRAMES = 140        # 280 transformer positions > context 250
MIMI_LONG_SPEECH_FRAMES = 95  # whole frames of input.wav, then a synthetic tail
LM_USER_FRAMES = 48           # user frames fed to the LM (codes of mimi_ls1)


# --------------------------------------------------------------------------------------------
# Configurations (Parley config.json layout: "lm" = moshi _lm_kwargs names,
# "mimi" = moshi _mimi_config structure).
# --------------------------------------------------------------------------------------------

def mimi_config(context: int) -> dict:
    return {
        "sample_rate": 24000,
        "channels": 1,
        "frame_rate": 12.5,
        "seanet": {
            "channels": 1, "dimension": 32, "causal": True, "n_filters": 4,
            "n_residual_layers": 1, "activation": "ELU", "compress": 2, "dilation_base": 2,
            "disable_norm_outer_blocks": 0, "kernel_size": 7, "residual_kernel_size": 3,
            "last_kernel_size": 3, "norm": "none", "pad_mode": "constant",
            "ratios": [8, 6, 5, 4], "true_skip": True,
        },
        "quantizer": {
            "dimension": 16, "n_q": 16, "bins": 64,
            "input_dimension": 32, "output_dimension": 32,
        },
        "transformer": {
            "d_model": 32, "num_heads": 2, "num_layers": 2, "causal": True,
            "layer_scale": 1.0, "context": context, "conv_layout": True,
            "max_period": 10000, "gating": "none", "norm": "layer_norm",
            "positional_embedding": "rope", "dim_feedforward": 64,
            "input_dimension": 32, "output_dimensions": [32],
        },
    }


def lm_config(dep_q: int, context: int) -> dict:
    return {
        "dim": 64, "text_card": 256, "existing_text_padding_id": 3,
        "n_q": 16, "dep_q": dep_q, "card": 64,
        "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125,
        "causal": True, "layer_scale": None, "context": context, "max_period": 10000,
        "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
        "depformer_dim": 32, "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_layer_scale": None,
        "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
        "depformer_gating": "silu", "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": list(REAL_DELAYS),
    }


# --------------------------------------------------------------------------------------------
# Deterministic file writers.
# --------------------------------------------------------------------------------------------

def write_npz(path: Path, arrays: dict) -> None:
    """Like np.savez, but with fixed zip timestamps so that the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


_IN_PROJ = re.compile(r"^(.*self_attn\.)in_projs\.(\d+)\.weight$")
_OUT_PROJ = re.compile(r"^(.*self_attn\.)out_projs\.(\d+)\.weight$")


def to_fused(state: dict) -> dict:
    """moshi 0.2.13 per-step attention names -> the published fused names (REFERENCE.md §4.6)."""
    fused: dict = {}
    groups: dict = {}
    for key, value in state.items():
        m = _IN_PROJ.match(key) or _OUT_PROJ.match(key)
        if m is None:
            fused[key] = value.detach().clone().contiguous()
            continue
        kind = "in_proj_weight" if ".in_projs." in key else "out_proj.weight"
        groups.setdefault(m.group(1) + kind, {})[int(m.group(2))] = value
    for key, parts in groups.items():
        assert sorted(parts) == list(range(len(parts))), key
        fused[key] = torch.cat([parts[i] for i in range(len(parts))], dim=0).contiguous()
    return dict(sorted(fused.items()))


def save_fused(path: Path, model: torch.nn.Module) -> dict:
    fused = to_fused(model.state_dict())
    for key, value in fused.items():
        assert value.dtype == torch.float32, (key, value.dtype)
        assert not re.search(r"in_projs\.|out_projs\.", key), key
    save_file(fused, str(path), metadata={"format": "pt"})
    return fused


def assert_same_layout(fused: dict, published: Path) -> None:
    """Same key names and shapes as a file in the published layout (the shared tiny model)."""
    ref = load_file(str(published))
    assert set(fused) == set(ref), sorted(set(fused) ^ set(ref))
    for key, value in ref.items():
        assert tuple(fused[key].shape) == tuple(value.shape), key


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), "key sets differ after reload"
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), f"{key} differs after reload"


# --------------------------------------------------------------------------------------------
# Signals.
# --------------------------------------------------------------------------------------------

def read_wav_int16(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 24000
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def synthetic_tail_int16(n: int) -> np.ndarray:
    """Chirp with amplitude modulation, a silent gap and noise bursts (deterministic)."""
    rng = np.random.default_rng(7)
    t = np.arange(n, dtype=np.float64) / 24000.0
    dur = n / 24000.0
    f0, f1 = 80.0, 6000.0
    k = math.log(f1 / f0) / dur
    phase = 2 * math.pi * f0 * (np.exp(k * t) - 1.0) / k
    env = 0.25 * (1.0 + 0.6 * np.sin(2 * math.pi * 2.5 * t))
    x = env * np.sin(phase)
    # A 0.4 s silent gap in the middle.
    g0 = int(0.45 * n)
    x[g0:g0 + 9600] = 0.0
    # Five 60 ms white-noise bursts.
    for start in (0.1, 0.3, 0.62, 0.8, 0.93):
        s = int(start * n)
        x[s:s + 1440] += 0.15 * rng.standard_normal(min(1440, n - s))
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def sine_frame() -> np.ndarray:
    n = np.arange(FRAME, dtype=np.float64)
    return (0.5 * np.sin(2 * math.pi * 440.0 * n / 24000.0)).astype(np.float32)


def as_pcm(x: np.ndarray) -> torch.Tensor:
    """[T] float32 -> [1, 1, T] tensor."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(1, 1, -1)


# --------------------------------------------------------------------------------------------
# Mimi: construction, re-initialisation, codebook fitting, streaming runs.
# --------------------------------------------------------------------------------------------

def build_mimi(cfg: dict, path: Path | None = None):
    model = loaders.get_mimi(None if path is None else str(path), mimi_config=cfg,
                             device="cpu", num_codebooks=8)
    model.eval()
    return model


def reinit_mimi(model, g: torch.Generator) -> None:
    """Controlled scales of REFERENCE.md §4.2 (codebooks are fitted separately)."""
    touched = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.ConvTranspose1d):
                w = mod.weight  # [in, out/groups, k]
                fan = (mod.in_channels // mod.groups) * mod.kernel_size[0] / mod.stride[0]
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan))
                touched.add(f"{mname}.weight")
                if mod.bias is not None:
                    mod.bias.copy_(0.01 * torch.randn(mod.bias.shape, generator=g))
                    touched.add(f"{mname}.bias")
            elif isinstance(mod, torch.nn.Conv1d):
                w = mod.weight  # [out, in/groups, k]
                fan = w.shape[1] * w.shape[2]
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan))
                touched.add(f"{mname}.weight")
                if mod.bias is not None:
                    mod.bias.copy_(0.01 * torch.randn(mod.bias.shape, generator=g))
                    touched.add(f"{mname}.bias")
            elif isinstance(mod, torch.nn.Linear):
                assert mod.bias is None
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(mod.in_features))
                touched.add(f"{mname}.weight")
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
                touched.update({f"{mname}.weight", f"{mname}.bias"})
            elif isinstance(mod, LayerScale):
                mod.scale.copy_(0.5 + torch.rand(mod.scale.shape, generator=g))
                touched.add(f"{mname}.scale")
    params = {n for n, _ in model.named_parameters()}
    assert params == touched, (sorted(params - touched), sorted(touched - params))


def load_mimi_state(dst, src) -> None:
    """load_state_dict does not drop the codebooks' lazily cached `_embedding`: do it here."""
    dst.load_state_dict(src.state_dict())
    for _, rvq in codebooks(dst):
        for layer in rvq.vq.layers:
            layer._codebook._embedding = None


def codebooks(model):
    q = model.quantizer
    return [("rvq_first", q.rvq_first), ("rvq_rest", q.rvq_rest)]


@torch.no_grad()
def fit_codebooks(model, latent: torch.Tensor, g: torch.Generator) -> None:
    """REFERENCE.md §4.3: Gaussian centroids from the statistics of the real residuals."""
    for _, rvq in codebooks(model):
        resid = rvq.input_proj(latent)  # [1, D, N]
        for layer in rvq.vq.layers:  # every stored level, also the unused ones
            cb = layer._codebook
            r = resid[0].T  # [N, D]
            mean, std = r.mean(0), r.std(0)
            cent = mean[None] + std[None] * torch.randn(cb.embedding_sum.shape, generator=g)
            usage = 0.5 + torch.rand(cb.cluster_usage.shape, generator=g)
            cb.embedding_sum.copy_(cent * usage[:, None])
            cb.cluster_usage.copy_(usage)
            cb._initialized.fill_(1.0)
            cb._embedding = None  # the lazily cached embedding must be recomputed
            codes = layer.encode(resid)
            resid = resid - layer.decode(codes)


@torch.no_grad()
def quantizer_margins(model, latent: torch.Tensor, codes: torch.Tensor) -> tuple[float, float]:
    """(min relative gap, min absolute gap) between nearest and second-nearest centroid over
    the 8 used levels; also re-derives the codes and checks them against `codes` [8, F]."""
    q = model.quantizer
    rel, ab = math.inf, math.inf
    level = 0
    for name, rvq in codebooks(model):
        resid = rvq.input_proj(latent)
        for layer in rvq.vq.layers[: rvq.n_q]:
            emb = layer._codebook.embedding
            x = resid[0].T
            d = torch.cdist(x[None], emb[None], p=2)[0]
            top = torch.topk(d, 2, dim=-1, largest=False).values
            gap = top[:, 1] - top[:, 0]
            rel = min(rel, float((gap / top[:, 1]).min()))
            ab = min(ab, float(gap.min()))
            mine = d.argmin(-1)
            assert torch.equal(mine, codes[level]), f"{name} level mismatch"
            resid = resid - layer.decode(mine[None])
            level += 1
    assert level == 8 == q.num_codebooks
    return rel, ab


@torch.no_grad()
def mimi_stream(model, pcm: np.ndarray) -> dict:
    """Streaming encode (one 1920-sample frame per call, fresh state), the streamed latent,
    one-shot encode, and streaming decode of the streamed codes (fresh state)."""
    n = pcm.shape[0] // FRAME
    assert n * FRAME == pcm.shape[0]
    x = as_pcm(pcm)
    codes, lat = [], []
    with model.streaming(1):
        for f in range(n):
            codes.append(model.encode(x[:, :, f * FRAME:(f + 1) * FRAME]))
    with model.streaming(1):
        for f in range(n):
            lat.append(model._encode_to_unquantized_latent(x[:, :, f * FRAME:(f + 1) * FRAME]))
    codes_stream = torch.cat(codes, dim=-1)[0]      # [8, F]
    latent = torch.cat(lat, dim=-1)                 # [1, 32, F]
    assert torch.equal(model.quantizer.encode(latent)[0], codes_stream)
    codes_full = model.encode(x)[0]                 # [8, F]
    latent_full = model._encode_to_unquantized_latent(x)
    out = []
    with model.streaming(1):
        for f in range(n):
            out.append(model.decode(codes_stream[None, :, f:f + 1]))
    pcm_out = torch.cat(out, dim=-1)[0, 0]
    assert pcm_out.shape[0] == n * FRAME
    return {
        "codes_stream": codes_stream, "codes_full": codes_full,
        "latent": latent, "latent_full": latent_full, "pcm_out": pcm_out,
    }


@torch.no_grad()
def one_frame_codes(model, pcm: np.ndarray) -> torch.Tensor:
    with model.streaming(1):
        return model.encode(as_pcm(pcm))[0, :, 0]


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """First frame index (last axis) where two [K, F] code arrays differ."""
    diff = (a != b).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0, 0])


# --------------------------------------------------------------------------------------------
# LM: construction, re-initialisation, streaming and teacher forcing.
# --------------------------------------------------------------------------------------------

def build_lm(cfg: dict, path: Path | None = None):
    return loaders.get_moshi_lm(None if path is None else str(path), lm_kwargs=cfg,
                                device="cpu", dtype=torch.float32)


def reinit_lm(lm, g: torch.Generator) -> None:
    """Controlled scales of REFERENCE.md §4.1."""
    nq1 = lm.n_q + 1
    touched = set()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(".alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.startswith(("emb.", "text_emb.")):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(nq1))
            elif name.startswith(("depformer_emb.", "depformer_text_emb.")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.startswith(("text_linear.", "linears.")):
                p.copy_(torch.randn(p.shape, generator=g) * 5.0 / math.sqrt(p.shape[1]))
            else:
                assert p.dim() == 2 and name.endswith(".weight"), name
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            touched.add(name)
    assert touched == set(lm.state_dict()), sorted(set(lm.state_dict()) ^ touched)


@torch.no_grad()
def lm_stream(lm, step_inputs: torch.Tensor) -> dict:
    """Greedy LMGen run. step_inputs: [S, Ki] long, row s = the tokens passed at step s."""
    rec = {"text_logits": [], "text": [], "audio": [], "dep_logits": []}
    lm_gen = LMGen(
        lm, use_sampling=False, temp=0.0, temp_text=0.0, top_k=250, top_k_text=25,
        on_text_logits_hook=lambda t: rec["text_logits"].append(t[0, 0, 0].clone()),
        on_text_hook=lambda t: rec["text"].append(t[0].clone()),
        on_audio_hook=lambda a: rec["audio"].append(a[0].clone()),
    )
    orig = lm.forward_depformer

    def recording_forward_depformer(cb_index, sequence, transformer_out):
        logits = orig(cb_index, sequence, transformer_out)
        rec["dep_logits"].append(logits[0, 0, 0].clone())
        return logits

    lm.forward_depformer = recording_forward_depformer  # observe only
    emitted, returned_none = [], []
    try:
        with lm_gen.streaming(1):
            for s in range(step_inputs.shape[0]):
                out = lm_gen.step(step_inputs[s].view(1, -1, 1))
                if out is None:
                    returned_none.append(s)
                else:
                    emitted.append(out[0, :, 0].clone())
    finally:
        del lm.forward_depformer
    S, dq = step_inputs.shape[0], lm.dep_q
    dep = torch.stack(rec["dep_logits"]).view(S, dq, -1)
    return {
        "lm_tokens": torch.stack(emitted, dim=1),           # [1 + dep_q, S - 1]
        "text_logits": torch.stack(rec["text_logits"]),    # [S, text_card]
        "text_sampled": torch.stack(rec["text"]),          # [S]
        "audio_sampled": torch.stack(rec["audio"]),        # [S, dep_q]
        "audio_logits": dep,                               # [S, dep_q, card]
        "none_steps": returned_none,
    }


def greedy_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.reshape(-1, logits.shape[-1]), 2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def max_const_run(x: torch.Tensor) -> int:
    best = run = 1
    for i in range(1, x.numel()):
        run = run + 1 if x[i] == x[i - 1] else 1
        best = max(best, run)
    return best


def lm_quality(run: dict) -> dict:
    text, cb0 = run["text_sampled"], run["audio_sampled"][:, 0]
    return {
        "text_margin": greedy_margin(run["text_logits"]),
        "audio_margin": greedy_margin(run["audio_logits"]),
        "distinct_text": int(text.unique().numel()),
        "distinct_cb0": int(cb0.unique().numel()),
        "max_run_text": max_const_run(text),
        "max_run_cb0": max_const_run(cb0),
    }


def lm_ok(qual: dict) -> bool:
    return (qual["distinct_text"] >= 10 and qual["distinct_cb0"] >= 10
            and qual["max_run_text"] <= 8 and qual["max_run_cb0"] <= 8)


def double_first_frame(user_codes: torch.Tensor) -> torch.Tensor:
    """[F, 8] -> [F + 1, 8]: frame 0 at steps 0 and 1, frame j at step j + 1."""
    return torch.cat([user_codes[:1], user_codes], dim=0)


def check_alignment(run: dict, delays: list[int]) -> None:
    """lm_tokens column j (returned at step j + 1) = text and delay-0 codes sampled at step j,
    delay-1 codes sampled at step j + 1."""
    toks, S = run["lm_tokens"], run["text_sampled"].shape[0]
    assert run["none_steps"] == [0], run["none_steps"]
    assert toks.shape[1] == S - 1
    for j in range(S - 1):
        assert toks[0, j] == run["text_sampled"][j]
        for k in range(toks.shape[0] - 1):
            assert toks[1 + k, j] == run["audio_sampled"][j + delays[1 + k], k], (j, k)


@torch.no_grad()
def teacher_forced(lm, codes: torch.Tensor) -> dict:
    out = lm(codes[None])
    return {"tf_logits": out.logits[0], "tf_text_logits": out.text_logits[0, 0],
            "tf_mask": out.mask[0], "tf_text_mask": out.text_mask[0, 0]}


def check_tf(run: dict, tf: dict, delays: list[int], dep_q: int) -> dict:
    """Streaming vs teacher forcing (REFERENCE.md §5). Returns observed errors."""
    T = tf["tf_text_logits"].shape[0]
    text_err = float((tf["tf_text_logits"] - run["text_logits"][:T]).abs().max())
    assert text_err < 1e-4, text_err
    assert torch.equal(tf["tf_text_logits"].argmax(-1), run["text_sampled"][:T])
    audio_err = 0.0
    exceptions = []
    toks = run["lm_tokens"]
    for k in range(dep_q):
        d = delays[1 + k]
        for j in range(T):
            lg = tf["tf_logits"][k, j]
            valid = bool(tf["tf_mask"][k, j])
            assert valid == (not torch.isnan(lg).any()), (k, j)
            if not valid:
                assert j + d >= T, (k, j)
                continue
            stream = run["audio_logits"][j + d, k]
            err = float((lg - stream).abs().max())
            if dep_q == 16 and k == 8 and j == 0:
                # User cb0 (delay 0) follows the delay-1 agent cb7 in the depth chain: at frame 0
                # the batch forward feeds the initial token where streaming fed a sampled one.
                exceptions.append({"codebook": k, "frame": j, "logit_err": err,
                                   "tf_argmax": int(lg.argmax()), "streamed": int(toks[1 + k, j])})
                assert err > 1e-3, "expected the documented frame-0 user-cb0 difference"
                continue
            audio_err = max(audio_err, err)
            assert int(lg.argmax()) == int(toks[1 + k, j]), (k, j)
    assert audio_err < 1e-4, audio_err
    return {"text_logit_max_err": text_err, "audio_logit_max_err": audio_err,
            "exceptions": exceptions}


# --------------------------------------------------------------------------------------------
# The streaming attention window of the reference, observed directly.
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def capture_attention_masks():
    """Record the boolean masks that moshi's StreamingMultiheadAttention hands to SDPA."""
    real_f = moshi_transformer.F
    masks: list = []

    class _Proxy:
        def __getattr__(self, name):
            return getattr(real_f, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
            masks.append(None if attn_mask is None else attn_mask.clone())
            return real_f.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=dropout_p, **kw)

    moshi_transformer.F = _Proxy()
    try:
        yield masks
    finally:
        moshi_transformer.F = real_f


@torch.no_grad()
def observe_window(context: int, T: int, chunks: int) -> dict:
    """Number of keys each query of a chunk of T positions attends to, chunk after chunk, in
    moshi's streaming attention with a ring of `context` slots (RingKVCache)."""
    g = torch.Generator().manual_seed(0)
    mha = StreamingMultiheadAttention(8, 1, causal=True, context=context, rope=None)
    with capture_attention_masks() as masks, mha.streaming(1):
        for _ in range(chunks):
            x = torch.randn(1, T, 8, generator=g)
            mha(x, x, x)
    counts = [[int(m[0, 0, t].sum()) for t in range(T)] for m in masks]
    exact = [[min(c * T + t + 1, context) for t in range(T)] for c in range(chunks)]
    first = next((c for c in range(chunks) if counts[c] != exact[c]), None)
    return {"context": context, "positions_per_call": T,
            "visible_keys_steady_state": counts[-1],
            "exact_window_would_see": exact[-1],
            "first_call_differing_from_exact_window": first}


# --------------------------------------------------------------------------------------------
# Variant generation.
# --------------------------------------------------------------------------------------------

def versions_meta(seed: int, convention: str | None, notes: list[str], **extra) -> dict:
    meta = {
        "generator": "scripts/make_reference_fixtures.py",
        "torch": torch.__version__,
        "moshi": moshi.__version__,
        "numpy": np.__version__,
        "seed": seed,
        "threads": THREADS,
        "dtype": "float32",
        "first_frame_convention": convention,
        "notes": notes,
    }
    meta.update(extra)
    return meta


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.int64).numpy()


def make_mimi_variants(out: Path, log) -> np.ndarray:
    speech = read_wav_int16(SHARED_TINY / "input.wav")
    long_i16 = np.concatenate([
        speech[: MIMI_LONG_SPEECH_FRAMES * FRAME],
        synthetic_tail_int16((MIMI_LONG_FRAMES - MIMI_LONG_SPEECH_FRAMES) * FRAME),
    ])
    long_pcm = long_i16.astype(np.float32) / 32768.0
    ls1_pcm = long_pcm[: MIMI_LS1_FRAMES * FRAME].copy()
    ctx_pcm = long_pcm[: MIMI_CTX_FRAMES * FRAME].copy()
    silence = np.zeros(FRAME, dtype=np.float32)
    sine = sine_frame()

    cfg250, cfg6 = mimi_config(250), mimi_config(6)

    def candidate(seed: int):
        g = torch.Generator().manual_seed(seed)
        m250 = build_mimi(cfg250)
        reinit_mimi(m250, g)
        m6 = build_mimi(cfg6)
        load_mimi_state(m6, m250)
        with torch.no_grad():
            fit_lat = torch.cat([
                m250._encode_to_unquantized_latent(as_pcm(long_pcm)),
                m6._encode_to_unquantized_latent(as_pcm(ctx_pcm)),
                m250._encode_to_unquantized_latent(as_pcm(silence)),
                m250._encode_to_unquantized_latent(as_pcm(sine)),
            ], dim=-1)
        fit_codebooks(m250, fit_lat, g)
        # Scale the last decoder conv so that the decoded speech peaks at ~0.5.
        with torch.no_grad():
            peak = float(m250.decode(m250.encode(as_pcm(ls1_pcm))).abs().max())
            last = m250.decoder.model[14].conv.conv
            last.weight.mul_(0.5 / peak)
            last.bias.mul_(0.5 / peak)
        load_mimi_state(m6, m250)
        return m250, m6

    def evaluate(m250, m6) -> dict:
        runs = {
            "ls1": mimi_stream(m250, ls1_pcm),
            "ctx": mimi_stream(m6, ctx_pcm),
            "long": mimi_stream(m250, long_pcm),
        }
        margins = {}
        for name, r in runs.items():
            model = m6 if name == "ctx" else m250
            margins[name] = quantizer_margins(model, r["latent"], r["codes_stream"])
        extra = {}
        for name, sig in (("silence", silence), ("sine", sine)):
            with torch.no_grad():
                with m250.streaming(1):
                    lat = m250._encode_to_unquantized_latent(as_pcm(sig))
            c = one_frame_codes(m250, sig)
            margins[name] = quantizer_margins(m250, lat, c[:, None])
            extra[name] = c
        rel = min(v[0] for v in margins.values())
        ab = min(v[1] for v in margins.values())
        cb = runs["long"]["codes_stream"]
        distinct = min(int(cb[k].unique().numel()) for k in range(8))
        return {"runs": runs, "margins": margins, "rel": rel, "abs": ab,
                "distinct_min": distinct, "extra": extra}

    best = None
    for seed in MIMI_SEEDS:
        m250, m6 = candidate(seed)
        ev = evaluate(m250, m6)
        log(f"mimi seed {seed}: min rel gap {ev['rel']:.3e} abs {ev['abs']:.3e} "
            f"min distinct codes/level {ev['distinct_min']}")
        if ev["distinct_min"] >= 16 and (best is None or ev["rel"] > best[1]["rel"]):
            best = (seed, ev, m250)
    assert best is not None, "no Mimi seed gave varied codes"
    seed, ev_search, m250 = best
    log(f"mimi: kept seed {seed}")

    # Save once, reload per variant through the reference loader, and generate from the
    # reloaded models only.
    tmp = out / "_mimi_tmp.safetensors"
    fused = save_fused(tmp, m250)
    assert len(fused) == 150, len(fused)
    assert_same_layout(fused, SHARED_TINY / "tokenizer-e351c8d8-checkpoint125.safetensors")
    raw = tmp.read_bytes()
    tmp.unlink()

    results = {}
    for variant, cfg, pcm in (("mimi_ls1", cfg250, ls1_pcm), ("mimi_ctx", cfg6, ctx_pcm),
                              ("mimi_long", cfg250, long_pcm)):
        vdir = out / variant
        vdir.mkdir(parents=True, exist_ok=True)
        wpath = vdir / "mimi.safetensors"
        wpath.write_bytes(raw)
        reloaded = build_mimi(cfg, wpath)
        ref = build_mimi(cfg)
        load_mimi_state(ref, m250)
        assert_same_state(ref, reloaded)
        loaded = load_file(str(wpath))
        assert set(loaded) == set(fused) and all(torch.equal(loaded[k], fused[k]) for k in fused)
        r = mimi_stream(reloaded, pcm)
        search_run = ev_search["runs"][{"mimi_ls1": "ls1", "mimi_ctx": "ctx", "mimi_long": "long"}[variant]]
        for key in ("codes_stream", "codes_full", "latent", "pcm_out"):
            assert torch.equal(r[key], search_run[key]), (variant, key)
        results[variant] = (r, reloaded)

    # Cross-variant checks.
    ls1, ctx, long_ = results["mimi_ls1"][0], results["mimi_ctx"][0], results["mimi_long"][0]
    assert torch.equal(ls1["codes_stream"], ls1["codes_full"]), "streamed != one-shot (ls1)"
    assert torch.equal(long_["codes_stream"][:, :MIMI_LS1_FRAMES], ls1["codes_stream"])
    assert torch.equal(long_["pcm_out"][: MIMI_LS1_FRAMES * FRAME], ls1["pcm_out"])
    ls1_lat_err = float((ls1["latent"] - ls1["latent_full"]).abs().max())
    assert ls1_lat_err < 1e-5, ls1_lat_err
    ctx_first = first_mismatch(ctx["codes_stream"], ctx["codes_full"])
    long_first = first_mismatch(long_["codes_stream"], long_["codes_full"])
    ctx_vs_ls1 = first_mismatch(ctx["codes_stream"], ls1["codes_stream"][:, :MIMI_CTX_FRAMES])
    # Before the ring wraps (context 6 = 3 frames of 2 positions) streaming == one-shot.
    assert ctx_first is None or ctx_first >= 3, ctx_first
    assert long_first is None or long_first >= 125, long_first

    def lat_err(r, n):
        return float((r["latent"][..., :n] - r["latent_full"][..., :n]).abs().max())

    margins = {k: {"min_rel_gap": v[0], "min_abs_gap": v[1]} for k, v in ev_search["margins"].items()}
    silence_codes = ev_search["extra"]["silence"]
    sine_codes = ev_search["extra"]["sine"]
    common_notes = [
        "Same weights (identical mimi.safetensors bytes) in mimi_ls1, mimi_ctx and mimi_long; "
        "only transformer.context differs (250 / 6 / 250).",
        "Re-initialised per REFERENCE.md §4.2: conv weights N(0,1/fan_in), conv biases N(0,0.01^2), "
        "LayerNorm weight U(0.5,1.5) bias N(0,0.1^2), LayerScale vectors U(0.5,1.5), transformer "
        "linears N(0,1/fan_in); last decoder conv scaled so decoded speech peaks at ~0.5.",
        "Codebooks (all 16 stored levels) fitted to real residuals per REFERENCE.md §4.3; "
        "the first 8 levels are used (set_num_codebooks(8)).",
        "Seed chosen among %s for the largest minimum relative nearest/second-nearest centroid gap "
        "over all streamed frames of the three variants plus one silence and one 440 Hz sine frame."
        % MIMI_SEEDS,
    ]

    def mimi_meta(variant: str, extra_notes: list[str], **extra) -> dict:
        ctx = 6 if variant == "mimi_ctx" else 250
        window = observe_window(ctx, 2, ctx // 2 + 5)
        assert window["visible_keys_steady_state"] == [ctx - 1, ctx], window
        return versions_meta(seed, None, common_notes + extra_notes,
                             quantizer_margins=margins, streaming_window=window, **extra)

    # mimi_ls1
    vdir = out / "mimi_ls1"
    write_json(vdir / "config.json", {
        "model_type": "mimi",
        "mimi": cfg250,
        "meta": mimi_meta("mimi_ls1", [
            f"Input: the first {MIMI_LS1_FRAMES} frames of shared/fixtures/personaplex-tiny/input.wav "
            "(int16 / 32768).",
            "first_frame_convention is an LM notion; null here.",
        ], frames=MIMI_LS1_FRAMES, latent_stream_vs_full_max_abs=ls1_lat_err),
    })
    write_npz(vdir / "fixture.npz", {
        "pcm_in": ls1_pcm,
        "codes_stream": np64(ls1["codes_stream"]),
        "codes_full": np64(ls1["codes_full"]),
        "latent": np32(ls1["latent"][0].T),
        "latent_full": np32(ls1["latent_full"][0].T),
        "pcm_out": np32(ls1["pcm_out"]),
        "pcm_silence": silence,
        "codes_silence": np64(silence_codes),
        "pcm_sine": sine,
        "codes_sine": np64(sine_codes),
    })

    # mimi_ctx
    vdir = out / "mimi_ctx"
    write_json(vdir / "config.json", {
        "model_type": "mimi",
        "mimi": cfg6,
        "meta": mimi_meta("mimi_ctx", [
            f"Input: the first {MIMI_CTX_FRAMES} frames of input.wav (same as mimi_ls1's first frames).",
            "Transformer context 6: the streaming ring wraps after 3 frames (6 positions); compare "
            "streaming with streaming. codes_full / latent_full come from the one-shot path (exact "
            "window of 6) and are NOT expected to equal the streamed arrays after the wrap.",
            "first_frame_convention is an LM notion; null here.",
        ], frames=MIMI_CTX_FRAMES,
            codes_full_first_mismatch_frame=ctx_first,
            codes_vs_mimi_ls1_first_mismatch_frame=ctx_vs_ls1,
            latent_stream_vs_full_max_abs_first_3_frames=lat_err(ctx, 3)),
    })
    write_npz(vdir / "fixture.npz", {
        "pcm_in": ctx_pcm,
        "codes_stream": np64(ctx["codes_stream"]),
        "codes_full": np64(ctx["codes_full"]),
        "latent": np32(ctx["latent"][0].T),
        "latent_full": np32(ctx["latent_full"][0].T),
        "pcm_out": np32(ctx["pcm_out"]),
    })

    # mimi_long
    vdir = out / "mimi_long"
    sel = list(range(0, 4)) + list(range(116, MIMI_LONG_FRAMES))
    pcm_long_out = long_["pcm_out"].view(MIMI_LONG_FRAMES, FRAME)
    write_json(vdir / "config.json", {
        "model_type": "mimi",
        "mimi": cfg250,
        "meta": mimi_meta("mimi_long", [
            f"Input: {MIMI_LONG_SPEECH_FRAMES} frames of input.wav followed by "
            f"{MIMI_LONG_FRAMES - MIMI_LONG_SPEECH_FRAMES} frames of a synthetic chirp with AM, a "
            "silent gap and noise bursts (int16 values / 32768, like the speech).",
            f"{2 * MIMI_LONG_FRAMES} transformer positions > context 250: the ring wraps at frame 125. "
            "Compare streaming with streaming past the window.",
            "pcm_out is stored only for the frames in pcm_out_frame_idx (size).",
            "first_frame_convention is an LM notion; null here.",
        ], frames=MIMI_LONG_FRAMES, codes_full_first_mismatch_frame=long_first,
            latent_stream_vs_full_max_abs_first_125_frames=lat_err(long_, 125)),
    })
    write_npz(vdir / "fixture.npz", {
        "pcm_in": long_pcm,
        "codes_stream": np64(long_["codes_stream"]),
        "codes_full": np64(long_["codes_full"]),
        "latent": np32(long_["latent"][0].T),
        "latent_full": np32(long_["latent_full"][0].T),
        "pcm_out_frame_idx": np.asarray(sel, dtype=np.int64),
        "pcm_out_frames": np32(pcm_long_out[sel]),
    })
    log(f"mimi: ls1/ctx/long written (ctx codes_full first mismatch {ctx_first}, "
        f"long {long_first}); margins {margins}")
    return np64(ls1["codes_stream"]).T.copy()  # [F, 8] user codes for the LM variants


def pick_lm_seed(seeds, cfgs, step_inputs, log, tag):
    best = None
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        base = build_lm(cfgs[0])
        reinit_lm(base, g)
        quals = []
        for cfg in cfgs:
            lm = base if cfg is cfgs[0] else build_lm(cfg)
            if lm is not base:
                lm.load_state_dict(base.state_dict())
            quals.append(lm_quality(lm_stream(lm, step_inputs)))
        ok = all(lm_ok(q) for q in quals)
        score = min(min(q["text_margin"], q["audio_margin"]) for q in quals)
        log(f"{tag} seed {seed}: ok={ok} min margin {score:.4f} "
            + " | ".join(f"text {q['text_margin']:.4f} audio {q['audio_margin']:.4f} "
                         f"dt {q['distinct_text']} dc {q['distinct_cb0']} "
                         f"run {q['max_run_text']}/{q['max_run_cb0']}" for q in quals))
        if ok and (best is None or score > best[1]):
            best = (seed, score, base, quals)
    assert best is not None, f"{tag}: no seed passed the variety checks"
    log(f"{tag}: kept seed {best[0]}")
    return best


def make_lm_variants(out: Path, user_codes_np: np.ndarray, log) -> None:
    user_codes = torch.from_numpy(user_codes_np[:LM_USER_FRAMES]).long()  # [F, 8]
    F = user_codes.shape[0]
    steps = double_first_frame(user_codes)                                 # [F + 1, 8]
    S = steps.shape[0]

    common_notes = [
        "Re-initialised per REFERENCE.md §4.1: RMSNorm alpha U(0.5,1.5); emb.*/text_emb "
        "N(0,1)/sqrt(n_q+1); depformer_emb.*/depformer_text_emb N(0,1); text_linear and linears.* "
        "N(0,1)*5/sqrt(fan_in); every other matrix N(0,1/fan_in).",
        "user_codes are the first 48 frames of tests/fixtures/reference/mimi_ls1 codes_stream "
        "(transposed to [F, 8]).",
        "Greedy LMGen (use_sampling=False), fp32, CPU, batch 1.",
    ]

    # ---- dep_q 8 (context 3000) and its context-8 twin (same weights) ----
    cfg8, cfg8c = lm_config(8, 3000), lm_config(8, 8)
    seed8, score8, base8, quals8 = pick_lm_seed(LM8_SEEDS, [cfg8, cfg8c], steps, log, "lm dep8")
    tmp = out / "_lm8_tmp.safetensors"
    fused = save_fused(tmp, base8)
    assert len(fused) == 75, len(fused)
    raw8 = tmp.read_bytes()
    tmp.unlink()

    for variant, cfg, qual in (("lm_dep8", cfg8, quals8[0]), ("lm_ctx8", cfg8c, quals8[1])):
        vdir = out / variant
        vdir.mkdir(parents=True, exist_ok=True)
        wpath = vdir / "lm.safetensors"
        wpath.write_bytes(raw8)
        lm = build_lm(cfg, wpath)
        ref = build_lm(cfg)
        ref.load_state_dict(base8.state_dict())
        assert_same_state(ref, lm)
        loaded = load_file(str(wpath))
        assert set(loaded) == set(fused) and all(torch.equal(loaded[k], fused[k]) for k in fused)
        run = lm_stream(lm, steps)
        check_alignment(run, cfg["delays"])
        # Same run twice: bit-identical.
        run2 = lm_stream(lm, steps)
        for key in ("lm_tokens", "text_logits", "audio_logits"):
            assert torch.equal(run[key], run2[key]), key
        arrays = {
            "user_codes": np64(user_codes),
            "step_input": np64(steps),
            "lm_tokens": np64(run["lm_tokens"]),
            "text_logits": np32(run["text_logits"]),
            "text_sampled": np64(run["text_sampled"]),
            "audio_logits": np32(run["audio_logits"]),
            "audio_sampled": np64(run["audio_sampled"]),
        }
        meta_extra = {"steps": S, "user_frames": F, "emitted_frames": S - 1,
                      "step_returning_none": run["none_steps"], "margins": qual,
                      "shares_weights_with": "lm_ctx8" if variant == "lm_dep8" else "lm_dep8"}
        notes = list(common_notes)
        if variant == "lm_dep8":
            tf_codes = torch.cat([run["lm_tokens"], user_codes.T], dim=0)  # [17, F]
            tf = teacher_forced(lm, tf_codes)
            errs = check_tf(run, tf, cfg["delays"], 8)
            arrays.update({
                "tf_codes": np64(tf_codes),
                "tf_logits": np32(tf["tf_logits"]),
                "tf_text_logits": np32(tf["tf_text_logits"]),
            })
            meta_extra["tf_vs_stream"] = errs
            notes.append("Same weights (identical lm.safetensors bytes) as lm_ctx8.")
        else:
            ref_run = lm_stream(build_lm_like(cfg8, lm), steps)
            div = first_divergence(run, ref_run, 1e-3)
            assert div == 8, div
            pre = float((run["text_logits"][:8] - ref_run["text_logits"][:8]).abs().max())
            assert pre < 1e-5, pre
            # moshi 0.2.13 keeps an exact sliding window of `context` keys when one position is
            # fed per call, so the one-pass forward (exact window) matches streaming here too.
            tf_codes = torch.cat([run["lm_tokens"], user_codes.T], dim=0)
            errs = check_tf(run, teacher_forced(lm, tf_codes), cfg["delays"], 8)
            window = observe_window(8, 1, 12)
            assert window["visible_keys_steady_state"] == [8], window
            meta_extra.update({
                "first_step_differing_from_context_3000": div,
                "max_text_logit_diff_vs_context_3000_steps_0_7": pre,
                "tf_vs_stream_past_window": errs,
                "streaming_window": window,
            })
            notes.append("Same weights as lm_dep8, context 8: the temporal KV ring (8 slots) wraps "
                         "at step 8, and the text logits leave the context-3000 run at step 8.")
        write_json(vdir / "config.json", {
            "model_type": "moshi",
            "lm": cfg,
            "meta": versions_meta(seed8, "double", notes + [
                f"LM seed chosen among {LM8_SEEDS} (min greedy top1-top2 margin over text and "
                "depformer logits of both the context-3000 and context-8 runs, with >= 10 distinct "
                "text tokens and cb0 values and no constant run > 8)."], **meta_extra),
        })
        write_npz(vdir / "fixture.npz", arrays)
        log(f"{variant}: written, margins {qual}")

    # ---- dep_q 16 ----
    cfg16 = lm_config(16, 3000)
    seed16, score16, base16, quals16 = pick_lm_seed(LM16_SEEDS, [cfg16], steps, log, "lm dep16")
    vdir = out / "lm_dep16"
    vdir.mkdir(parents=True, exist_ok=True)
    wpath = vdir / "lm.safetensors"
    fused = save_fused(wpath, base16)
    assert len(fused) == 115, len(fused)
    assert_same_layout(fused, SHARED_TINY / "model.safetensors")
    lm = build_lm(cfg16, wpath)
    ref = build_lm(cfg16)
    ref.load_state_dict(base16.state_dict())
    assert_same_state(ref, lm)
    run = lm_stream(lm, steps)
    check_alignment(run, cfg16["delays"])
    # LMGen with dep_q 16 needs 0 user tokens and drops what it is given: an empty input
    # must give the very same run.
    run_empty = lm_stream(lm, torch.zeros((S, 0), dtype=torch.long))
    for key in ("lm_tokens", "text_logits", "audio_logits"):
        assert torch.equal(run[key], run_empty[key]), key
    tf_codes = run["lm_tokens"].clone()  # [17, F]: all 17 streams were generated
    tf = teacher_forced(lm, tf_codes)
    errs = check_tf(run, tf, cfg16["delays"], 16)
    write_json(vdir / "config.json", {
        "model_type": "moshi",
        "lm": cfg16,
        "meta": versions_meta(seed16, "double", common_notes + [
            "Kyutai's LMGen with dep_q 16 takes 0 user tokens: the 8 user codes passed at each step "
            "(step_input, same as lm_dep8) are sliced away and never used; a run with an empty "
            "[1, 0, 1] input was asserted identical. All 16 audio codebooks are generated.",
            f"LM seed chosen among {LM16_SEEDS} (same criteria as lm_dep8).",
        ], steps=S, user_frames=F, emitted_frames=S - 1, step_returning_none=run["none_steps"],
            margins=quals16[0], tf_vs_stream=errs, user_input_used=False),
    })
    write_npz(vdir / "fixture.npz", {
        "user_codes": np64(user_codes),
        "step_input": np64(steps),
        "lm_tokens": np64(run["lm_tokens"]),
        "text_logits": np32(run["text_logits"]),
        "text_sampled": np64(run["text_sampled"]),
        "audio_logits": np32(run["audio_logits"]),
        "audio_sampled": np64(run["audio_sampled"]),
        "tf_codes": np64(tf_codes),
        "tf_logits": np32(tf["tf_logits"]),
        "tf_text_logits": np32(tf["tf_text_logits"]),
    })
    log(f"lm_dep16: written, margins {quals16[0]}, tf {errs}")


def build_lm_like(cfg: dict, src) -> torch.nn.Module:
    lm = build_lm(cfg)
    lm.load_state_dict(src.state_dict())
    return lm


def first_divergence(a: dict, b: dict, tol: float) -> int | None:
    diff = ((a["text_logits"] - b["text_logits"]).abs() > tol).any(dim=-1).nonzero()
    return None if diff.numel() == 0 else int(diff[0, 0])


# --------------------------------------------------------------------------------------------

def generate(out: Path, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    user_codes = make_mimi_variants(out, log)
    make_lm_variants(out, user_codes, log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare with --out bit for bit")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    if not args.check:
        generate(args.out, log)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), log)
        bad = []
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp)
                q = args.out / rel
                if not q.exists() or not filecmp.cmp(p, q, shallow=False):
                    bad.append(str(rel))
        if bad:
            print("DIFFERENT:", *bad, sep="\n  ")
            return 1
        print("all regenerated files are bit-identical to", args.out)
        return 0


if __name__ == "__main__":
    sys.exit(main())
