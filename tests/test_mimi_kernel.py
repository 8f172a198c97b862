"""engine/mimi/transformer_kernel.py: Mimi's transformer step as CUDA kernels.

The kernels need MLX's CUDA backend: on a CUDA machine the tests marked `cuda` run them against
the MLX operations; `scripts/check_fused_kernels.py --mimi` times them there and `--nvrtc`
compiles them anywhere. Here each kernel is stood in for by numpy code doing what its docstring
says (the rings written in place, as the kernel does), which checks how the transformer hands a
frame to the five kernels and takes it back: arguments, layouts, ring slots across a wrap. With
bfloat16 weights (`MimiTransformer(weights="bfloat16")`) the stand-ins get the bf16 matrices,
widened exactly as the kernels widen them, so they compute what the kernels should.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from engine.lm import fused
from engine.mimi import transformer_kernel
from engine.mimi.transformer import MimiTransformer, _Layer
from tests.test_fused import cuda

D, H, F, C, P = 32, 2, 64, 24, 2  # a small transformer with a short ring, so frames wrap it
WEIGHTS = ["float32", "bfloat16"]  # how the matrices are stored (MimiTransformer's `weights`)


def _params(seed: int, layers: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)

    def m(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def v(n, lo, hi):
        return rng.uniform(lo, hi, n).astype(np.float32)

    return [{"norm1.weight": v(D, 0.5, 1.5), "norm1.bias": v(D, -0.1, 0.1),
             "norm2.weight": v(D, 0.5, 1.5), "norm2.bias": v(D, -0.1, 0.1),
             "self_attn.in_proj_weight": m(3 * D, D), "self_attn.out_proj.weight": m(D, D),
             "linear1.weight": m(F, D), "linear2.weight": m(D, F),
             "layer_scale_1.scale": v(D, 0.2, 0.5), "layer_scale_2.scale": v(D, 0.2, 0.5)}
            for _ in range(layers)]


def _transformer(params, kernel: bool, context: int = C,
                 weights: str = "float32") -> MimiTransformer:
    return MimiTransformer(params, d_model=D, num_heads=H, context=context, max_period=10000.0,
                           positions_per_frame=P, kernel=kernel, weights=weights)


def _np(a) -> np.ndarray:
    """float64 values of an array (bf16 ones widened first: numpy has no bfloat16)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a, dtype=np.float64)


def _layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w + b


def _stand_in(monkeypatch, calls: list) -> None:
    """mx.fast.cuda_kernel replaced by numpy versions of the five kernels (evaluated eagerly, so
    only for uncompiled frames), each call checked against the kernel's declaration."""
    from math import erf

    gelu = np.vectorize(lambda v: v * 0.5 * (1.0 + erf(v / np.sqrt(2.0))))

    def fake_cuda_kernel(**kw):
        kind = kw["name"].split("_")[2]
        src = kw["source"]

        def call(*, inputs, template, output_shapes, output_dtypes, grid, threadgroup):
            assert len(inputs) == len(kw["input_names"]) and len(output_shapes) == 1
            assert threadgroup == (transformer_kernel.NT, 1, 1) and grid[0] % threadgroup[0] == 0
            t = dict(template)
            a = dict(zip(kw["input_names"], inputs))
            mx.eval(list(a.values()))
            calls.append(kind)
            if "w" in a:  # the weight element type the kernel is compiled for is the array's
                assert t["W"] == a["w"].dtype
            else:
                assert "W" not in t
            p, d = t["P"], t["D"]
            if kind == "qkv":
                hd = t["HD"]
                y = _layer_norm(_np(a["x"]).reshape(p, d), _np(a["nw"]), _np(a["nb"])) @ _np(a["w"]).T
                cos = _np(a["cosv"]).reshape(p, 1, hd // 2)
                sin = _np(a["sinv"]).reshape(p, 1, hd // 2)
                qk = y[:, :2 * d].reshape(p, 2 * d // hd, hd // 2, 2)
                re_, im = qk[..., 0], qk[..., 1]
                y[:, :2 * d] = np.stack([re_ * cos - im * sin, re_ * sin + im * cos], -1).reshape(p, -1)
                assert grid[0] >= 3 * d // 2 * 32  # a warp per pair of rows
            elif kind == "attn":
                hd, c = t["HD"], t["C"]
                heads = d // hd
                scale = float(re.search(r"s \* ([-0-9.e]+)f \+ mrow", src).group(1))
                qkv = _np(a["qkv"]).reshape(p, 3, heads, hd)
                keys = np.concatenate([_np(a["kring"]).reshape(heads, c, hd),
                                       qkv[:, 1].transpose(1, 0, 2)], 1)
                vals = np.concatenate([_np(a["vring"]).reshape(heads, c, hd),
                                       qkv[:, 2].transpose(1, 0, 2)], 1)
                s = np.einsum("phd,hkd->phk", qkv[:, 0], keys) * scale
                s = s + _np(a["mask"]).reshape(p, 1, c + p)
                e = np.exp(s - s.max(-1, keepdims=True))
                y = np.einsum("phk,hkd->phd", e / e.sum(-1, keepdims=True), vals)
                assert grid[0] == heads * p * threadgroup[0]  # a block per (head, query)
            elif kind == "out":
                hd, c = t["HD"], t["C"]
                heads = d // hd
                y = _np(a["x"]).reshape(p, d) + _np(a["ls"]) * (_np(a["attn"]).reshape(p, d) @ _np(a["w"]).T)
                qkv = np.array(a["qkv"]).reshape(p, 3, heads, hd)
                start = int(np.array(a["start"])[0])
                for ring, part in ((a["kring"], 1), (a["vring"], 2)):
                    view = np.asarray(memoryview(ring)).reshape(heads, c, hd)  # in place
                    for q in range(p):
                        view[:, (start + q) % c] = qkv[q, part]
                assert grid[0] >= 2 * p * d  # a thread per ring value written
            elif kind == "ffn":
                y = gelu(_layer_norm(_np(a["x"]).reshape(p, d), _np(a["nw"]), _np(a["nb"]))
                         @ _np(a["w"]).T)
            elif kind == "down":
                y = _np(a["x"]).reshape(p, d) + _np(a["ls"]) * (_np(a["hg"]).reshape(p, -1) @ _np(a["w"]).T)
            else:
                raise AssertionError(kind)
            assert y.size == int(np.prod(output_shapes[0]))
            return [mx.array(y.reshape(output_shapes[0]).astype(np.float32))]
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    transformer_kernel._kernel.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_kernels():
    transformer_kernel._kernel.cache_clear()
    yield
    transformer_kernel._kernel.cache_clear()


def _frames(n: int, seed: int = 1) -> list[mx.array]:
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal((P, D)).astype(np.float32)) for _ in range(n)]


def _assert_same_stream(kern: MimiTransformer, ref: MimiTransformer, rtol: float, atol: float):
    """Frames streamed through both (the ring wraps three times) give the same outputs, and leave
    the same keys and values in every layer's ring."""
    for i, x in enumerate(_frames(3 * C // P + 3)):
        np.testing.assert_allclose(np.array(kern(x)), np.array(ref(x)), rtol=rtol, atol=atol,
                                   err_msg=f"frame {i}")
    for a, b in zip(kern.state_arrays(), ref.state_arrays()):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_weights_as_rows_give_the_same_transformer(weights):
    """The kernels read PyTorch's [out, in] rows; the MLX path on those (x @ W.T) is the same
    transformer as on the CPU's [in, out] copies."""
    params = _params(0)
    a, b = _transformer(params, False, weights=weights), _transformer(params, False)
    b.layers = [_Layer(p, out_in=True, weight_dtype=a.layers[0].in_proj.dtype) for p in params]
    assert b.layers[0].in_proj.shape == (3 * D, D) and a.layers[0].in_proj.shape == (D, 3 * D)
    for x in _frames(3 * C // P):
        np.testing.assert_allclose(np.array(b(x)), np.array(a(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(b.ring_k[1]), np.array(a.ring_k[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_frames_through_the_kernels_match_the_mlx_path_across_ring_wraps(monkeypatch, weights):
    calls: list[str] = []
    _stand_in(monkeypatch, calls)
    params = _params(2)
    ref = _transformer(params, False, weights=weights)
    kern = _transformer(params, True, weights=weights)
    assert kern.kernel and not ref.kernel
    assert kern.layers[0].linear2.dtype == ref.layers[0].linear2.dtype == getattr(mx, weights)
    _assert_same_stream(kern, ref, rtol=2e-4, atol=2e-5)
    assert calls[:10] == ["qkv", "attn", "out", "ffn", "down"] * 2  # five kernels a layer


def test_chunks_longer_than_a_frame_keep_to_the_mlx_operations(monkeypatch):
    """Whole-clip calls (several frames at once) do not go through the one-frame kernels."""
    calls: list[str] = []
    _stand_in(monkeypatch, calls)
    params = _params(3)
    ref, kern = _transformer(params, False), _transformer(params, True)
    x = mx.array(np.random.default_rng(4).standard_normal((4 * P, D)).astype(np.float32))
    np.testing.assert_allclose(np.array(kern(x)), np.array(ref(x)), rtol=1e-5, atol=1e-5)
    assert calls == []


@pytest.mark.parametrize("weights", WEIGHTS)
def test_codec_frames_through_the_kernels(tiny_dir, monkeypatch, weights):
    """The tiny Mimi's streamed decode and encode with its transformers on the stand-in kernels
    equal the plain codec's (uncompiled frames: the stand-ins evaluate eagerly)."""
    from engine.mimi import Mimi
    calls: list[str] = []
    _stand_in(monkeypatch, calls)
    monkeypatch.setenv("PARLEY_MIMI_KERNEL", "0")
    plain = Mimi.load(tiny_dir / "tokenizer-e351c8d8-checkpoint125.safetensors",
                      _tiny_mimi_config(tiny_dir), transformer_weights=weights)
    monkeypatch.delenv("PARLEY_MIMI_KERNEL")
    monkeypatch.setattr(transformer_kernel, "enabled", lambda: True)
    kern = Mimi.load(tiny_dir / "tokenizer-e351c8d8-checkpoint125.safetensors",
                     _tiny_mimi_config(tiny_dir), transformer_weights=weights)
    assert kern.decoder_transformer.kernel and kern.encoder_transformer.kernel
    assert not plain.decoder_transformer.kernel
    for m in (plain, kern):
        m.compile = False
        m.reset()
    rng = np.random.default_rng(5)
    for _ in range(4):
        codes = rng.integers(0, plain.cardinality, plain.num_codebooks)
        np.testing.assert_allclose(np.array(kern.decode_step(codes)),
                                   np.array(plain.decode_step(codes)), rtol=1e-3, atol=1e-5)
    pcm = (0.1 * rng.standard_normal(plain.frame_size)).astype(np.float32)
    got, want = np.array(kern.encode_step(pcm)), np.array(plain.encode_step(pcm))
    if not fused.enabled():  # on CUDA MLX's float32 products may use TF32: a code can flip
        assert (got == want).all()
    assert calls.count("qkv") == (4 * len(kern.decoder_transformer.layers)
                                  + len(kern.encoder_transformer.layers))


def _tiny_mimi_config(tiny_dir):
    from engine.config import load_model_config
    return load_model_config(tiny_dir).mimi


def test_enabled_only_on_cuda_and_off_by_switch(monkeypatch):
    monkeypatch.delenv("PARLEY_MIMI_KERNEL", raising=False)
    monkeypatch.setattr(fused, "enabled", lambda: True)
    assert transformer_kernel.enabled()
    monkeypatch.setenv("PARLEY_MIMI_KERNEL", "0")
    assert not transformer_kernel.enabled()
    monkeypatch.setattr(fused, "enabled", lambda: False)
    monkeypatch.delenv("PARLEY_MIMI_KERNEL")
    assert not transformer_kernel.enabled()
    assert transformer_kernel.supports(512, 8, 2048) and not transformer_kernel.supports(30, 2, 64)
    assert not transformer_kernel.supports(36, 4, 64)  # heads of 9: no rotation pairs


@cuda
@pytest.mark.parametrize("weights", WEIGHTS)
def test_on_cuda_the_kernels_match_the_mlx_operations(weights):
    """With bf16 weights both sides read the same bf16 matrices (the MLX path widens them for its
    products, the kernels as they load them): they agree as closely as with float32."""
    params = _params(6)
    ref = _transformer(params, False, weights=weights)
    kern = _transformer(params, True, weights=weights)
    assert kern.layers[0].in_proj.dtype == getattr(mx, weights)
    _assert_same_stream(kern, ref, rtol=2e-3, atol=2e-4)


@cuda
@pytest.mark.parametrize("weights", WEIGHTS)
def test_on_cuda_compiled_codec_frames_match(tiny_dir, monkeypatch, weights):
    """The tiny Mimi's compiled streaming frames, kernels on and off, across a ring wrap."""
    from engine.mimi import Mimi
    path = tiny_dir / "tokenizer-e351c8d8-checkpoint125.safetensors"
    monkeypatch.setenv("PARLEY_MIMI_KERNEL", "0")
    plain = Mimi.load(path, _tiny_mimi_config(tiny_dir), transformer_weights=weights)
    monkeypatch.delenv("PARLEY_MIMI_KERNEL")
    kern = Mimi.load(path, _tiny_mimi_config(tiny_dir), transformer_weights=weights)
    assert kern.decoder_transformer.kernel and not plain.decoder_transformer.kernel
    plain.reset()
    kern.reset()
    rng = np.random.default_rng(7)
    for i in range(140):  # 250 positions of context: the ring wraps at frame 125
        codes = rng.integers(0, plain.cardinality, plain.num_codebooks)
        got, want = kern.decode_step(codes), plain.decode_step(codes)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-2, atol=1e-4,
                                   err_msg=f"frame {i}")


def test_the_frame_path_and_the_bench_name_them(tiny_dir, monkeypatch, capsys):
    import json

    from engine.duplex import DuplexEngine
    from engine.mimi import Mimi
    from tui.cli import main
    engine = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32")
    assert "Mimi" not in engine.frame_path  # this CPU: MLX operations
    monkeypatch.setattr(transformer_kernel, "enabled", lambda: True)
    engine.mimi = Mimi.load(tiny_dir / "tokenizer-e351c8d8-checkpoint125.safetensors",
                            _tiny_mimi_config(tiny_dir))
    assert engine.frame_path.endswith("Mimi transformer kernels")
    monkeypatch.undo()
    assert main(["bench", "--model", str(tiny_dir), "--frames", "2", "--warmup", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mimi_kernels"] is fused.enabled()
