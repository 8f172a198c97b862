"""LM loading: checkpoint validation (CheckpointError naming the key), naming variants, the Moshi
layout, random weights, quantization (8 and 4 bits, the group-size predicate, embeddings and heads
quantized with the linears by default, the −1 zero token) and the converted-weights cache."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from safetensors.numpy import load_file, save_file  # noqa: E402

from engine.config import load_model_config  # noqa: E402
from engine.errors import CheckpointError  # noqa: E402
from engine.lm import LMGen, LMModel  # noqa: E402
from engine.lm.checkpoint import expected_lm_tensors  # noqa: E402
from engine.lm.layers import Embedding  # noqa: E402
from engine.lm.random_weights import (random_lm_weights, write_random_lm_checkpoint)  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return load_model_config(tiny_dir)


@pytest.fixture(scope="module")
def weights(tiny_dir):
    return load_file(str(tiny_dir / "model.safetensors"))


def _frames(cfg, n):
    pad = cfg.lm.existing_text_padding_id
    return np.array([[pad] + list(cfg.lmgen.silence_tokens) + list(cfg.lmgen.sine_tokens)] * n)


def _run(model, cfg, n_user=6, seed=0):
    """A short greedy session on random user codes: (outputs, text logits per step)."""
    rng = np.random.default_rng(seed)
    gen = LMGen(model, cfg.lmgen, greedy=True)
    gen.prefill(None, _frames(cfg, 8))
    outs, logits = [], [gen.last_text_logits]
    for _ in range(n_user):
        outs.append(gen.step(user_codes=rng.integers(0, cfg.lm.card, 8)))
        logits.append(gen.last_text_logits)
    return np.array(outs), np.array(logits)


def test_tensor_counts(cfg):
    assert len(expected_lm_tensors(cfg.lm)) == 115
    assert len(expected_lm_tensors(dataclasses.replace(cfg.lm, dep_q=8))) == 75
    from engine.config import parse_model_config
    full = parse_model_config({}).lm
    assert len(expected_lm_tensors(full)) == 475
    assert len(expected_lm_tensors(dataclasses.replace(full, dep_q=8))) == 355
    n = sum(int(np.prod(s)) for s in expected_lm_tensors(full).values())
    assert n == 8_371_408_896
    n8 = sum(int(np.prod(s)) for s in expected_lm_tensors(dataclasses.replace(full, dep_q=8)).values())
    assert n8 == 7_687_729_152


# ----------------------------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------------------------


def _save(tmp_path, w, name="model.safetensors"):
    p = tmp_path / name
    save_file(w, str(p))
    return p


def _one_sentence(msg: str):
    assert msg.endswith(".") and msg.count(". ") == 0 and "\n" not in msg, msg


def test_missing_key(tmp_path, cfg, weights):
    w = dict(weights)
    del w["depformer.layers.0.gating.3.linear_out.weight"]
    with pytest.raises(CheckpointError) as e:
        LMModel.load(_save(tmp_path, w), cfg.lm)
    assert "missing tensor 'depformer.layers.0.gating.3.linear_out.weight'" in str(e.value)
    _one_sentence(str(e.value))


def test_unexpected_key(tmp_path, cfg, weights):
    w = dict(weights)
    w["transformer.layers.2.norm1.alpha"] = w["transformer.layers.1.norm1.alpha"]
    with pytest.raises(CheckpointError) as e:
        LMModel.load(_save(tmp_path, w), cfg.lm)
    assert "unexpected tensor 'transformer.layers.2.norm1.alpha'" in str(e.value)
    _one_sentence(str(e.value))


def test_wrong_shape(tmp_path, cfg, weights):
    w = dict(weights)
    w["text_linear.weight"] = w["text_linear.weight"][:-1]
    with pytest.raises(CheckpointError) as e:
        LMModel.load(_save(tmp_path, w), cfg.lm)
    assert "'text_linear.weight'" in str(e.value) and "[255, 64]" in str(e.value)
    _one_sentence(str(e.value))


def test_wrong_dep_q(tmp_path, cfg, weights):
    with pytest.raises(CheckpointError) as e:
        LMModel.load(_save(tmp_path, dict(weights)), dataclasses.replace(cfg.lm, dep_q=8))
    assert "16 depth steps" in str(e.value) and "dep_q 8" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header_json", "not_float"])
def test_corrupt_file(tmp_path, tiny_dir, cfg, weights, damage):
    src = (tiny_dir / "model.safetensors").read_bytes()
    p = tmp_path / "model.safetensors"
    if damage == "truncated":
        p.write_bytes(src[: len(src) - 1000])
    elif damage == "garbage":
        p.write_bytes(os.urandom(4096))
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "header_json":
        n = struct.unpack("<Q", src[:8])[0]
        p.write_bytes(src[:8] + b"{" * n + src[8 + n:])
    else:
        w = dict(weights)
        w["out_norm.alpha"] = w["out_norm.alpha"].astype(np.int32)
        p = _save(tmp_path, w)
    with pytest.raises(CheckpointError) as e:
        LMModel.load(p, cfg.lm)
    _one_sentence(str(e.value))
    assert "model.safetensors" in str(e.value)


def test_missing_file(tmp_path, cfg):
    with pytest.raises(CheckpointError, match="does not exist"):
        LMModel.load(tmp_path / "nope.safetensors", cfg.lm)


# ----------------------------------------------------------------------------------------------
# Naming variants, layouts, random weights
# ----------------------------------------------------------------------------------------------


def test_per_step_naming_loads_identically(tmp_path, tiny_dir, cfg, weights):
    w = {}
    D = cfg.lm.depformer_dim
    for k, v in weights.items():
        if k.endswith("self_attn.in_proj_weight"):
            base = k[: -len("in_proj_weight")]
            for i, part in enumerate(np.split(v, v.shape[0] // (3 * (D if k.startswith("depformer") else cfg.lm.dim)))):
                w[f"{base}in_projs.{i}.weight"] = np.ascontiguousarray(part)
        elif k.endswith("self_attn.out_proj.weight"):
            base = k[: -len("out_proj.weight")]
            rows = D if k.startswith("depformer") else cfg.lm.dim
            for i, part in enumerate(np.split(v, v.shape[0] // rows)):
                w[f"{base}out_projs.{i}.weight"] = np.ascontiguousarray(part)
        else:
            w[k] = v
    w["some.vq._initialized"] = np.ones(1, dtype=np.float32)
    a = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, depformer_steps=16)
    b = LMModel.load(_save(tmp_path, w), cfg.lm, depformer_steps=16)
    for (ka, va), (kb, vb) in zip(sorted(a.arrays().items()), sorted(b.arrays().items())):
        assert ka == kb
        assert mx.array_equal(va, vb), ka


def test_from_weights_equals_load(tiny_dir, cfg, weights):
    a = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)
    b = LMModel.from_weights(weights, cfg.lm)
    for k, v in a.arrays().items():
        assert mx.array_equal(v, b.arrays()[k]), k


def test_random_weights_and_moshi_layout(tmp_path, cfg):
    lm8 = dataclasses.replace(cfg.lm, dep_q=8)
    w = random_lm_weights(lm8, seed=3)
    assert len(w) == 75 and all(v.dtype == np.float32 for v in w.values())
    # Controlled init (REFERENCE.md §4.1).
    assert 0.5 <= w["out_norm.alpha"].min() and w["out_norm.alpha"].max() <= 1.5
    assert abs(w["emb.0.weight"].std() - 1 / np.sqrt(17)) < 0.02
    assert abs(w["depformer_emb.0.weight"].std() - 1) < 0.1
    assert abs(w["transformer.layers.0.gating.linear_in.weight"].std() - 1 / 8) < 0.01
    assert abs(w["text_linear.weight"].std() - 5 / 8) < 0.05
    # Streamed writing gives the same numbers (f32) and bf16 bits match the dict form.
    p = tmp_path / "m.safetensors"
    write_random_lm_checkpoint(p, lm8, seed=3, dtype="float32")
    back = load_file(str(p))
    assert set(back) == set(w)
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])
    wb = random_lm_weights(lm8, seed=3, dtype="bfloat16")
    pb = tmp_path / "mb.safetensors"
    write_random_lm_checkpoint(pb, lm8, seed=3, dtype="bfloat16")
    model = LMModel.load(pb, lm8, dtype="bfloat16")
    assert model.depformer_steps == 8  # Moshi: dep_q 8 steps
    ref = mx.array(wb["text_emb.weight"]).view(mx.bfloat16)
    assert mx.array_equal(model.text_emb.weight, ref)
    outs, _ = _run(model, cfg)
    assert outs.shape == (6, 17)


def test_bf16_close_to_fp32(tiny_dir, cfg):
    a = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, dtype="float32")
    b = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, dtype="bfloat16")
    la = _run(a, cfg, n_user=1)[1][0]
    lb = _run(b, cfg, n_user=1)[1][0]
    scale = np.abs(la).max()
    assert np.abs(la - lb).max() < 0.05 * scale


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(8, 64), (8, 32), (4, 32), (4, 64)])
def test_quantized_loading(tiny_dir, cfg, bits, group):
    ref = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)
    q = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, quantize=bits, group_size=group,
                     cache=False)
    lay = q.temporal.layers[0]
    assert lay.in_proj.quantized and lay.out_proj.quantized and lay.linear_in.quantized
    # The FFN output's input dim (176) is not a multiple of 32 or 64: left unquantized.
    assert not lay.linear_out.quantized
    dl = q.depformer.layers[0]
    assert dl.in_proj.quantized == (32 % group == 0)  # depformer dim 32
    assert not dl.linear_out.quantized  # 88
    assert q.depformer.depformer_in.quantized  # input dim 64
    # Embeddings and heads are quantized with them (the default) where the group divides.
    assert q.text_emb.scales is not None and q.emb[0].scales is not None and q.text_linear.quantized
    assert (q.depformer.text_emb.scales is not None) == (32 % group == 0)
    assert q.depformer.heads.quantized == (32 % group == 0)
    assert q.nbytes() < ref.nbytes()
    # Same inputs (the prompt frames): the last prefill position's text logits.
    la = _run(ref, cfg, n_user=3)[1][0]
    lq = _run(q, cfg, n_user=3)[1][0]
    rel = np.abs(la - lq).max() / np.abs(la).max()
    print(f"q{bits} g{group}: text-logit error relative to scale {rel:.3f}")
    assert rel < (0.02 if bits == 8 else 0.3)


def test_quantized_embeddings_keep_zero_token(tiny_dir, cfg):
    q = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, quantize=8, group_size=32,
                     quantize_embeddings=True, quantize_heads=True, cache=False)
    assert q.text_emb.scales is not None and q.text_linear.quantized
    e = q.emb[3]
    out = e(mx.array([-1, 5, -1]))
    assert mx.all(out[0] == 0).item() and mx.all(out[2] == 0).item()
    assert not mx.all(out[1] == 0).item()
    x = q.embed(mx.array([[-1] * 17, [-1] * 16 + [4]]))
    assert mx.all(x[0, 0] == 0).item()
    # A plain embedding too.
    plain = Embedding(mx.arange(12, dtype=mx.float32).reshape(3, 4))
    assert mx.array_equal(plain(mx.array([-1, 2])), mx.array([[0, 0, 0, 0], [8, 9, 10, 11]], dtype=mx.float32))
    _run(q, cfg, n_user=2)


@pytest.mark.parametrize("quantized", [False, True])
def test_step_embedding_is_one_gather_equal_to_the_per_channel_sum(tiny_dir, cfg, quantized):
    """A step's embedding (one gather over the stacked audio tables, one over text, −1 channels
    skipped) equals the per-channel lookup-and-sum the batched path does, bit for bit."""
    import re
    import tempfile

    kw = dict(quantize=8, group_size=32, quantize_embeddings=True) if quantized else {}
    m = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, dtype="bfloat16", cache=False, **kw)
    rows = [[5] + list(range(3, 19)), [-1] + [7] * 8 + [-1] * 8, [-1] * 17,
            [9, -1, 2, -1, 4] + [1] * 12]
    for row in rows:
        step = m.embed_step(row, compiled=True)
        assert np.array_equal(np.array(step.astype(mx.float32)),
                              np.array(m.embed(mx.array([row])).astype(mx.float32)))
        assert np.array_equal(np.array(m.embed_step(row, compiled=False).astype(mx.float32)),
                              np.array(step.astype(mx.float32)))
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as fh:
        mx.export_to_dot(fh.name, m.embed_step(rows[0], compiled=False))
        kinds = re.findall(r'label ="([^"]+)", shape=rectangle', Path(fh.name).read_text())
    assert kinds.count("Gather") == (6 if quantized else 2)
    with pytest.raises(ValueError, match="channel 2"):
        m.embed_step([0, 1, -2] + [0] * 14)


def test_converted_weights_cache(tmp_path, tiny_dir, cfg):
    src = tmp_path / "model.safetensors"
    src.write_bytes((tiny_dir / "model.safetensors").read_bytes())
    cache = tmp_path / "cache"
    fresh = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache)
    assert not fresh.loaded_from_cache
    files = list(cache.iterdir())
    assert len(files) == 1 and fresh.cache_path == files[0]
    again = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache)
    assert again.loaded_from_cache
    assert sorted(again.arrays()) == sorted(fresh.arrays())
    for k, v in fresh.arrays().items():
        assert mx.array_equal(v, again.arrays()[k]), k
    np.testing.assert_array_equal(_run(fresh, cfg)[0], _run(again, cfg)[0])
    # Other settings get their own entry; a changed source invalidates.
    other = LMModel.load(src, cfg.lm, quantize=8, group_size=32, cache_dir=cache)
    assert not other.loaded_from_cache and len(list(cache.iterdir())) == 2
    os.utime(src, ns=(1, 1))
    changed = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache)
    assert not changed.loaded_from_cache
    assert len(list(cache.iterdir())) == 2  # replaced its stale entry
    assert LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache).loaded_from_cache
    # A damaged cache file is rebuilt, not fatal.
    changed.cache_path.write_bytes(b"junk")
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache)
    assert not rebuilt.loaded_from_cache
    # Unquantized loads do not use the cache unless asked.
    plain = LMModel.load(src, cfg.lm, cache_dir=cache)
    assert plain.cache_path is None


def test_a_new_cache_entry_removes_the_ones_it_makes_useless(tmp_path, tiny_dir, cfg):
    """Writing an entry removes entries of an older cache format and entries of the same source
    and settings with other table/head storage (a default that changed); entries of other
    settings or sources, and files that are not entries, stay."""
    from engine.lm.model import CACHE_FORMAT, converted_cache_usage
    src = tmp_path / "model.safetensors"
    src.write_bytes((tiny_dir / "model.safetensors").read_bytes())
    cache = tmp_path / "cache"
    cache.mkdir()
    small = {"w": mx.zeros((4,))}
    mx.save_safetensors(str(cache / "lm-old.safetensors"), small,
                        metadata={"format": "parley-lm-converted-2", "key": "x"})
    mx.save_safetensors(str(cache / "lm-foreign.safetensors"), small, metadata={"format": "other"})
    (cache / "lm-junk.safetensors").write_bytes(b"junk")
    eight = LMModel.load(src, cfg.lm, quantize=8, group_size=32, cache_dir=cache)
    assert not (cache / "lm-old.safetensors").exists()  # an older format: never read again
    assert (cache / "lm-foreign.safetensors").exists() and (cache / "lm-junk.safetensors").exists()
    assert eight.cache_pruned == [cache / "lm-old.safetensors"]
    tables = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache,
                          quantize_embeddings=False, quantize_heads=False)
    assert tables.cache_path.exists() and eight.cache_path.exists()  # other settings: both stay
    default = LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache)
    assert not tables.cache_path.exists()  # same source and settings, other tables: superseded
    assert default.cache_pruned == [tables.cache_path]
    assert eight.cache_path.exists() and default.cache_path.exists()
    assert LMModel.load(src, cfg.lm, quantize=4, group_size=32, cache_dir=cache).loaded_from_cache
    assert LMModel.load(src, cfg.lm, quantize=8, group_size=32, cache_dir=cache).loaded_from_cache
    folder, n, size = converted_cache_usage(cache)
    assert folder == cache and n == 4  # two entries, the foreign file and the junk
    assert size == sum(p.stat().st_size for p in cache.glob("lm-*.safetensors"))
    _, meta = mx.load(str(default.cache_path), return_metadata=True)
    assert meta["format"] == CACHE_FORMAT and meta["source"] == str(src.resolve())
