"""Voices: the restricted .pt reader, saved safetensors voices, WAV voices, lookup and voices.tgz."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.errors import ParleyError, VoiceError
from engine.voices import (
    VoicePrompt,
    WavVoice,
    ensure_voices_unpacked,
    find_voice,
    list_voices,
    load_pt_voice,
    load_safetensors_voice,
    load_voice,
    save_voice,
)

FIXTURE = Path(__file__).parent / "fixtures" / "personaplex-tiny"
TINY0_PT = FIXTURE / "voices" / "TINY0.pt"
TINY0_WAV = FIXTURE / "voices" / "TINY0.wav"


# ---------------------------------------------------------------------------------------------
# A tiny writer for torch-style zip checkpoints, emitting pickle opcodes by hand (no torch).
# ---------------------------------------------------------------------------------------------


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_ops(key: str, storage: str, numel: int, size, stride, offset: int = 0) -> bytes:
    pid = _tuple([_u("storage"), _global("torch", storage), _u(key), _u("cpu"), _i(numel)])
    args = _tuple([
        pid + b"Q",  # BINPERSID
        _i(offset),
        _tuple([_i(v) for v in size]),
        _tuple([_i(v) for v in stride]),
        b"\x89",  # NEWFALSE (requires_grad)
        _global("collections", "OrderedDict") + b")R",  # OrderedDict()
    ])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _dict_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_u(k) + v for k, v in entries.items())
    return b"\x80\x02}(" + body + b"u."


def _write_pt(path: Path, pkl: bytes, storages: dict[str, bytes], prefix: str = "voice",
              byteorder: bytes | None = b"little") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def _make_voice_pt(path: Path, emb: np.ndarray, cache: np.ndarray, *, emb_storage="FloatStorage",
                   emb_raw: bytes | None = None, keys=("embeddings", "cache")) -> Path:
    n, d = emb.shape
    entries = {}
    storages = {}
    if "embeddings" in keys:
        entries["embeddings"] = _tensor_ops("0", emb_storage, n * d, (n, 1, 1, d), (d, d, d, 1))
        storages["0"] = emb_raw if emb_raw is not None else emb.astype("<f4").tobytes()
    if "cache" in keys:
        entries["cache"] = _tensor_ops("1", "LongStorage", cache.size, (1,) + cache.shape,
                                       (cache.size, cache.shape[1], 1))
        storages["1"] = cache.astype("<i8").tobytes()
    return _write_pt(path, _dict_pickle(entries), storages)


def _sine_tokens() -> list[int]:
    return json.loads((FIXTURE / "config.json").read_text())["lmgen"]["sine_tokens"]


# ---------------------------------------------------------------------------------------------
# .pt: the shipped fixture
# ---------------------------------------------------------------------------------------------


def test_tiny0_pt_loads_with_reference_shapes_and_values():
    v = load_pt_voice(TINY0_PT)
    assert isinstance(v, VoicePrompt)
    assert v.name == "TINY0" and v.source == str(TINY0_PT)
    assert v.embeddings.shape == (43, 64) and v.embeddings.dtype == np.float32
    assert v.cache.shape == (17, 4) and v.cache.dtype == np.int64
    assert v.num_frames == 44 and v.dim == 64
    assert np.isfinite(v.embeddings).all() and v.embeddings.std() > 0.1
    # The embeddings are the raw storage 0, contiguous [43,1,1,64] -> [43,64].
    with zipfile.ZipFile(TINY0_PT) as zf:
        raw = np.frombuffer(zf.read("TINY0/data/0"), dtype="<f4").reshape(43, 64)
    np.testing.assert_array_equal(v.embeddings, raw)
    # Cache (MODEL.md §7.3): text is PAD (3) in the slots of forced voice positions, the user
    # channels hold the sine tokens the reference fed during the voice phase, codes < card 64.
    cache = v.cache
    assert (cache[9:, :] == np.array(_sine_tokens())[:, None]).all()
    assert np.count_nonzero(cache[0] == 3) >= 3
    assert cache.min() >= 0 and cache.max() < 64
    # Immutable: a shared voice must not be edited in place by accident.
    with pytest.raises(ValueError):
        v.embeddings[0, 0] = 1.0


def test_bf16_storage_and_strides_are_honoured(tmp_path):
    vals = np.array([[1.5, -2.25, 0.0, 3.0], [0.125, -1.0, 65536.0, -0.5]], dtype=np.float32)
    bf16 = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact in bf16
    cache = np.arange(17 * 4, dtype=np.int64).reshape(17, 4)
    p = _make_voice_pt(tmp_path / "bf.pt", vals, cache, emb_storage="BFloat16Storage", emb_raw=bf16)
    v = load_pt_voice(p)
    assert v.embeddings.dtype == np.float32
    np.testing.assert_array_equal(v.embeddings, vals)
    np.testing.assert_array_equal(v.cache, cache)


def test_transposed_cache_stride(tmp_path):
    # A [1,17,4] tensor stored column-major (stride (68,1,17)) must still read correctly.
    cache = np.arange(68, dtype=np.int64).reshape(17, 4)
    emb = np.ones((2, 8), np.float32)
    entries = {
        "embeddings": _tensor_ops("0", "FloatStorage", 16, (2, 1, 1, 8), (8, 8, 8, 1)),
        "cache": _tensor_ops("1", "LongStorage", 68, (1, 17, 4), (68, 1, 17)),
    }
    storages = {"0": emb.tobytes(), "1": cache.T.copy().astype("<i8").tobytes()}
    v = load_pt_voice(_write_pt(tmp_path / "t.pt", _dict_pickle(entries), storages))
    np.testing.assert_array_equal(v.cache, cache)


# ---------------------------------------------------------------------------------------------
# .pt: malicious and broken files
# ---------------------------------------------------------------------------------------------


class _WritesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


def test_malicious_pickle_is_refused_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps({"embeddings": _WritesFile(marker), "cache": 0}, protocol=2)

    # Control: the payload is live, an ordinary unpickler really writes the file.
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps({"x": _WritesFile(control)}, protocol=2))
    assert control.read_text() == "pwned"

    p = _write_pt(tmp_path / "evil.pt", payload, {})
    with pytest.raises(VoiceError) as err:
        load_pt_voice(p)
    msg = str(err.value)
    assert "refuses to load" in msg and "contains code (`builtins.exec`)" in msg
    assert not marker.exists()


def test_shell_command_pickle_is_refused(tmp_path):
    marker = tmp_path / "shell.txt"
    payload = pickle.dumps(_RunsShell(marker), protocol=2)
    for protocol_payload in (payload, pickle.dumps(_RunsShell(marker), protocol=4)):
        p = _write_pt(tmp_path / "evil.pt", protocol_payload, {})
        with pytest.raises(VoiceError, match=r"contains code \(`(posix|nt|os)\.system`\)"):
            load_pt_voice(p)
    assert not marker.exists()


def test_code_hidden_inside_a_tensor_is_refused(tmp_path):
    # Valid-looking structure whose backward-hooks slot calls os.system instead of OrderedDict.
    marker = tmp_path / "hook.txt"
    ops = _tensor_ops("0", "FloatStorage", 4, (4,), (1,)).replace(
        _global("collections", "OrderedDict") + b")R",
        _global("os", "system") + _tuple([_u(f"touch '{marker}'")]) + b"R",
    )
    p = _write_pt(tmp_path / "hook.pt", _dict_pickle({"embeddings": ops}), {"0": bytes(16)})
    with pytest.raises(VoiceError, match=r"contains code \(`os\.system`\)"):
        load_pt_voice(p)
    assert not marker.exists()


def test_truncated_pt_is_a_voice_error(tmp_path):
    data = TINY0_PT.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 30):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(VoiceError, match="truncated or corrupt|not a valid") as err:
            load_pt_voice(p)
        assert str(p) in str(err.value)


def test_short_storage_is_a_voice_error(tmp_path):
    emb = np.ones((3, 8), np.float32)
    p = _make_voice_pt(tmp_path / "short.pt", emb, np.zeros((17, 4), np.int64),
                       emb_raw=emb.tobytes()[:-4])
    with pytest.raises(VoiceError, match="shorter than its tensor"):
        load_pt_voice(p)


def test_non_zip_and_empty_and_missing_files(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello, I am not a voice\n")
    with pytest.raises(VoiceError, match="is not a PyTorch voice file"):
        load_pt_voice(p)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(VoiceError, match="is empty"):
        load_pt_voice(empty)
    with pytest.raises(VoiceError, match="does not exist"):
        load_pt_voice(tmp_path / "nope.pt")


def test_pt_missing_keys(tmp_path):
    emb = np.ones((3, 8), np.float32)
    p = _make_voice_pt(tmp_path / "nocache.pt", emb, np.zeros((17, 4), np.int64),
                       keys=("embeddings",))
    with pytest.raises(VoiceError, match="has no `cache` tensor"):
        load_pt_voice(p)
    p = _make_voice_pt(tmp_path / "noemb.pt", emb, np.zeros((17, 4), np.int64), keys=("cache",))
    with pytest.raises(VoiceError, match="has no `embeddings` tensor"):
        load_pt_voice(p)
    # A zip that is not a torch checkpoint at all.
    z = tmp_path / "other.pt"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(VoiceError, match="data.pkl"):
        load_pt_voice(z)


def test_empty_voice_is_refused(tmp_path):
    p = _make_voice_pt(tmp_path / "empty_voice.pt", np.zeros((0, 64), np.float32),
                       np.zeros((17, 4), np.int64))
    with pytest.raises(VoiceError, match=r"holds no voice frames \(0 embeddings\)"):
        load_pt_voice(p)


def test_errors_are_one_sentence():
    # All VoiceErrors are ParleyErrors: the CLI prints them without a traceback.
    assert issubclass(VoiceError, ParleyError)


# ---------------------------------------------------------------------------------------------
# Saved safetensors voices
# ---------------------------------------------------------------------------------------------


def test_save_and_reload_safetensors_voice(tmp_path):
    v = load_pt_voice(TINY0_PT)
    out = save_voice(v, tmp_path / "saved" / "TINY0.safetensors")
    assert out.exists() and not list(out.parent.glob(".*tmp"))
    w = load_safetensors_voice(out)
    np.testing.assert_array_equal(w.embeddings, v.embeddings)
    np.testing.assert_array_equal(w.cache, v.cache)
    assert w.name == "TINY0" and w.num_frames == 44
    # The file uses the reference's tensor shapes and records what it is.
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        assert f.metadata()["format"] == "parley-voice"
        assert f.get_tensor("embeddings").shape == (43, 1, 1, 64)
        assert f.get_tensor("cache").shape == (1, 17, 4)
    # Dispatch by suffix.
    assert isinstance(load_voice(out), VoicePrompt)


def test_save_voice_refuses_bad_targets(tmp_path):
    v = load_pt_voice(TINY0_PT)
    with pytest.raises(VoiceError, match="must end in .safetensors"):
        save_voice(v, tmp_path / "x.pt")
    wav = WavVoice(audio=np.zeros(100, np.float32), name="w", source="w")
    with pytest.raises(VoiceError, match="still raw audio"):
        save_voice(wav, tmp_path / "w.safetensors")


def test_corrupt_safetensors_voice(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(VoiceError, match="not a valid safetensors"):
        load_safetensors_voice(p)
    good = save_voice(load_pt_voice(TINY0_PT), tmp_path / "good.safetensors").read_bytes()
    p.write_bytes(good[:-100])
    with pytest.raises(VoiceError, match="malformed"):
        load_safetensors_voice(p)


def test_bf16_safetensors_voice(tmp_path):
    # numpy cannot write bf16, so build the file by hand: 8-byte header length, JSON header, data.
    vals = np.array([[1.5, -2.0], [0.25, 4.0]], np.float32)
    emb = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    cache = np.zeros((1, 17, 4), "<i8").tobytes()
    header = json.dumps({
        "embeddings": {"dtype": "BF16", "shape": [2, 1, 1, 2], "data_offsets": [0, len(emb)]},
        "cache": {"dtype": "I64", "shape": [1, 17, 4],
                  "data_offsets": [len(emb), len(emb) + len(cache)]},
    }).encode()
    p = tmp_path / "b.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + emb + cache)
    v = load_safetensors_voice(p)
    np.testing.assert_array_equal(v.embeddings, vals)
    assert v.cache.shape == (17, 4)


# ---------------------------------------------------------------------------------------------
# WAV voices
# ---------------------------------------------------------------------------------------------


def test_wav_voice_is_24k_mono_at_minus_24_lufs():
    v = load_voice(TINY0_WAV)
    assert isinstance(v, WavVoice)
    info = sf.info(str(TINY0_WAV))
    assert v.audio.dtype == np.float32 and v.audio.ndim == 1
    assert v.audio.shape[0] == info.frames and v.sample_rate == 24000
    assert v.num_frames == 44  # 3.48 s -> 44 frames, as the .pt's 43 embeddings + 1
    from engine.loudness import integrated_loudness

    assert abs(integrated_loudness(v.audio.astype(np.float64), 24000) - (-24.0)) < 1e-3


def test_wav_voice_errors_are_voice_errors(tmp_path):
    p = tmp_path / "silence.wav"
    sf.write(str(p), np.zeros(0, np.int16), 24000, subtype="PCM_16")
    with pytest.raises(VoiceError, match="no audio|empty"):
        load_voice(p)


# ---------------------------------------------------------------------------------------------
# Lookup by name, list_voices, voices.tgz
# ---------------------------------------------------------------------------------------------


def _model_with_voices(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "voices").mkdir(parents=True)
    (model / "voices" / "NATF0.pt").write_bytes(TINY0_PT.read_bytes())
    (model / "voices" / "TINY0.wav").write_bytes(TINY0_WAV.read_bytes())
    return model


def test_lookup_by_name_case_insensitive(tmp_path):
    model = _model_with_voices(tmp_path)
    assert list_voices(model) == ["NATF0", "TINY0"]
    v = load_voice("natf0", model)
    assert isinstance(v, VoicePrompt) and v.name == "NATF0"
    assert isinstance(load_voice("TINY0", model), WavVoice)
    # A saved safetensors voice wins over the .pt of the same name.
    save_voice(v, model / "voices" / "NATF0.safetensors")
    assert find_voice("NATF0", model).suffix == ".safetensors"
    with pytest.raises(VoiceError, match=r"Unknown voice `NOPE`; available voices: NATF0, TINY0"):
        load_voice("NOPE", model)


def test_search_dirs_and_missing_paths(tmp_path):
    user = tmp_path / "uservoices"
    user.mkdir()
    save_voice(load_pt_voice(TINY0_PT), user / "Mine.safetensors")
    assert load_voice("mine", None, search_dirs=[user]).name == "TINY0"
    with pytest.raises(VoiceError, match="does not exist"):
        load_voice(tmp_path / "missing.pt")
    with pytest.raises(VoiceError, match="does not exist"):
        load_voice("missing.wav")
    with pytest.raises(VoiceError, match="unknown type"):
        bogus = tmp_path / "voice.mp4"
        bogus.write_bytes(b"x")
        load_voice(bogus)
    with pytest.raises(VoiceError, match="no voices found"):
        load_voice("NATF0", tmp_path / "empty_model")


def _tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def test_voices_tgz_is_unpacked_once(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    pt = TINY0_PT.read_bytes()
    d = tarfile.TarInfo("voices")
    d.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("voices/ALIAS.pt")
    link.type = tarfile.SYMTYPE
    link.linkname = "NATM1.pt"
    _tgz(model / "voices.tgz", [(d, None), (tarfile.TarInfo("voices/NATF0.pt"), pt),
                                (tarfile.TarInfo("voices/NATM1.pt"), pt), (link, None)])
    assert list_voices(model) == ["ALIAS", "NATF0", "NATM1"]
    assert (model / "voices" / "NATF0.pt").is_file()
    assert not (model / "voices" / "ALIAS.pt").is_symlink()
    assert not [p for p in model.iterdir() if p.name.startswith(".voices-unpack")]
    # Second call: nothing re-extracted (a marker file survives).
    (model / "voices" / "marker.txt").write_text("x")
    ensure_voices_unpacked(model)
    assert (model / "voices" / "marker.txt").exists()
    assert load_voice("NATM1", model).num_frames == 44


def test_voices_tgz_flat_layout(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    _tgz(model / "voices.tgz", [(tarfile.TarInfo("VARF3.pt"), TINY0_PT.read_bytes())])
    assert list_voices(model) == ["VARF3"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out", "hardlink_out", "device"])
def test_voices_tgz_refuses_escapes(tmp_path, kind):
    model = tmp_path / "model"
    model.mkdir()
    outside = tmp_path / "outside.txt"
    if kind == "dotdot":
        members = [(tarfile.TarInfo("voices/../../outside.txt"), b"x")]
    elif kind == "absolute":
        members = [(tarfile.TarInfo(str(outside)), b"x")]
    elif kind in ("symlink_out", "hardlink_out"):
        info = tarfile.TarInfo("voices/evil.pt")
        info.type = tarfile.SYMTYPE if kind == "symlink_out" else tarfile.LNKTYPE
        info.linkname = "../../outside.txt" if kind == "symlink_out" else "/etc/passwd"
        members = [(info, None)]
    else:
        info = tarfile.TarInfo("voices/dev")
        info.type = tarfile.CHRTYPE
        members = [(info, None)]
    _tgz(model / "voices.tgz", members)
    with pytest.raises(VoiceError, match="voices.tgz contains"):
        ensure_voices_unpacked(model)
    assert not outside.exists()
    assert not (model / "voices").exists()
    assert [p.name for p in model.iterdir()] == ["voices.tgz"]


def test_voices_tgz_into_existing_folder_without_voices(tmp_path):
    model = tmp_path / "model"
    (model / "voices").mkdir(parents=True)
    (model / "voices" / "README.txt").write_text("voices go here")
    _tgz(model / "voices.tgz", [(tarfile.TarInfo("voices/NATF0.pt"), TINY0_PT.read_bytes())])
    assert list_voices(model) == ["NATF0"]
    assert (model / "voices" / "README.txt").exists()


def test_truncated_voices_tgz(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    big = np.random.default_rng(0).integers(0, 255, 200_000, dtype=np.uint8).tobytes()
    tgz = _tgz(model / "voices.tgz", [(tarfile.TarInfo("voices/A.pt"), big)])
    tgz.write_bytes(tgz.read_bytes()[:5000])
    with pytest.raises(VoiceError, match="Cannot unpack .*voices.tgz"):
        ensure_voices_unpacked(model)
    assert not (model / "voices").exists()
