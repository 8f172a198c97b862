"""Audio file reading/writing: formats, resampling, mono, errors, the reference's int16 rounding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.audiofile import pcm16, read_audio, resample, write_wav
from engine.errors import AudioError

FIXTURE = Path(__file__).parent / "fixtures" / "personaplex-tiny"


def _tone(sr: int, n: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def test_reads_24k_mono_wav_exactly():
    x = read_audio(FIXTURE / "input.wav")
    raw, sr = sf.read(str(FIXTURE / "input.wav"), dtype="int16")
    assert sr == 24000 and x.dtype == np.float32 and x.shape == (183_098,)
    np.testing.assert_array_equal(x, raw.astype(np.float32) / 32768)


def test_96k_stereo_is_resampled_to_24k_mono_with_the_right_length(tmp_path):
    sr, n = 96000, 96000 + 7  # 1 s and 7 samples -> round(24001.75) = 24002 samples
    left = _tone(sr, n, 440.0, 0.4)
    right = _tone(sr, n, 440.0, 0.2)
    p = tmp_path / "stereo96k.wav"
    sf.write(str(p), np.stack([left, right], axis=1), sr, subtype="PCM_24")

    mixed = read_audio(p)
    assert mixed.dtype == np.float32 and mixed.shape == (24002,)
    # The mix of two in-phase sines of 0.4 and 0.2 is a 0.3 sine; after sinc resampling it is
    # still a clean 440 Hz tone of that amplitude (edges excluded).
    expected = _tone(24000, 24002, 440.0, 0.3)
    np.testing.assert_allclose(mixed[500:-500], expected[500:-500], atol=2e-3)

    first = read_audio(p, mono="first")
    np.testing.assert_allclose(first[500:-500], _tone(24000, 24002, 440.0, 0.4)[500:-500],
                               atol=2e-3)


def test_flac_and_other_target_rate(tmp_path):
    x = _tone(24000, 24000)
    p = tmp_path / "tone.flac"
    sf.write(str(p), x, 24000, subtype="PCM_16")
    y = read_audio(p)
    np.testing.assert_allclose(y, x, atol=1 / 32768)
    z = read_audio(p, target_sr=16000)
    assert z.shape == (16000,)


def test_resample_length_and_identity():
    x = _tone(44100, 44100 + 3)
    assert resample(x, 44100, 24000).shape == (round((44100 + 3) * 24000 / 44100),)
    np.testing.assert_array_equal(resample(x, 24000, 24000), x)
    assert resample(np.zeros(0, np.float32), 48000, 24000).shape == (0,)


def test_empty_wav_is_an_audio_error(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(str(p), np.zeros(0, np.int16), 24000, subtype="PCM_16")
    assert p.stat().st_size > 0  # a header, but no samples
    with pytest.raises(AudioError, match="contains no audio samples") as err:
        read_audio(p)
    assert str(p) in str(err.value)
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    with pytest.raises(AudioError, match=r"is empty \(0 bytes\)"):
        read_audio(zero)


def test_non_audio_file_is_an_audio_error(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("these are my meeting notes, not audio\n" * 20)
    with pytest.raises(AudioError, match="is not an audio file that can be read") as err:
        read_audio(p)
    assert "\n" not in str(err.value)


def test_missing_folder_and_unreadable(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        read_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="is a folder"):
        read_audio(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        p = tmp_path / "locked.wav"
        sf.write(str(p), _tone(24000, 100), 24000)
        p.chmod(0)
        with pytest.raises(AudioError, match="cannot be read"):
            read_audio(p)


def test_truncated_wav_is_read_or_refused_cleanly(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(str(good), _tone(24000, 24000), 24000, subtype="PCM_16")
    data = good.read_bytes()
    for cut in (12, 30, 44 + 1000):
        p = tmp_path / f"cut{cut}.wav"
        p.write_bytes(data[:cut])
        try:
            x = read_audio(p)
        except AudioError:
            continue
        assert x.dtype == np.float32 and x.ndim == 1 and x.shape[0] > 0


def test_write_wav_matches_the_reference_int16():
    """Writing the reference's decoded float frames must give its output.wav samples exactly."""
    tokens = np.load(FIXTURE / "reference" / "tokens.npz")
    ref, sr = sf.read(str(FIXTURE / "reference" / "output.wav"), dtype="int16")
    pcm = tokens["pcm_frames"].reshape(-1)[: ref.shape[0]]
    np.testing.assert_array_equal(pcm16(pcm), ref)


def test_write_wav_pcm16_clips_and_truncates(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 1e-5, -1e-5, np.nan], np.float32)
    p = write_wav(tmp_path / "o.wav", x)
    y, sr = sf.read(str(p), dtype="int16")
    info = sf.info(str(p))
    assert sr == 24000 and info.subtype == "PCM_16" and info.channels == 1
    assert y.tolist() == [0, 16383, -16383, 32767, -32767, 32767, -32767, 0, 0, 0]
    assert [q.name for q in tmp_path.iterdir()] == ["o.wav"]  # no temporary left behind


def test_write_wav_float_and_overwrite(tmp_path):
    x = _tone(24000, 500)
    p = tmp_path / "f.wav"
    p.write_bytes(b"old content")
    write_wav(p, x[None, :], float32=True)
    y, _ = sf.read(str(p), dtype="float32")
    assert sf.info(str(p)).subtype == "FLOAT"
    np.testing.assert_array_equal(y, x)


def test_write_wav_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "out.wav"
    p.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sf, "write", boom)
    with pytest.raises(AudioError, match="No space left on device"):
        write_wav(p, _tone(24000, 100))
    assert p.read_bytes() == b"previous"
    assert [q.name for q in tmp_path.iterdir()] == ["out.wav"]


def test_write_wav_errors(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        write_wav(tmp_path / "missing_dir" / "o.wav", np.zeros(10, np.float32))
    with pytest.raises(AudioError, match="expected mono audio"):
        write_wav(tmp_path / "o.wav", np.zeros((2, 10), np.float32))
