"""`parley offline` end to end against NVIDIA's reference run of the tiny PersonaPlex model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tui.cli import main

REF = "reference"


def offline(tmp_path, tiny_dir, *extra, input_wav=None, capsys=None):
    out = tmp_path / "out.wav"
    argv = ["offline", "--model", str(tiny_dir), "--greedy", "--dtype", "float32",
            "--input", str(input_wav or tiny_dir / "input.wav"), "--output", str(out),
            "--text", str(tmp_path / "out.json"), "--tokens", str(tmp_path / "tokens.npz"), *extra]
    return main(argv), out


def assert_matches_reference(tmp_path, tiny_dir):
    ref = np.load(tiny_dir / REF / "tokens.npz")
    got = np.load(tmp_path / "tokens.npz")
    assert got["out_tokens"].shape == ref["out_tokens"].shape == (96, 17)
    np.testing.assert_array_equal(got["out_tokens"], ref["out_tokens"])
    np.testing.assert_array_equal(got["user_codes"], ref["user_codes"])
    assert got["pcm_frames"].dtype == np.float32
    assert np.abs(got["pcm_frames"] - ref["pcm_frames"]).max() < 1e-4
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(
        (tiny_dir / REF / "output.json").read_text())
    ours, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    theirs, sr_ref = sf.read(tiny_dir / REF / "output.wav", dtype="float32")
    assert sr == sr_ref == 24000 and ours.ndim == 1
    assert ours.shape == theirs.shape == (183098,)  # exactly the input's length
    assert np.abs(ours - theirs).max() < 1e-4  # int16 files: at most one step apart


def test_pt_voice_reproduces_the_reference(tmp_path, tiny_dir):
    code, _ = offline(tmp_path, tiny_dir, "--voice", str(tiny_dir / "voices" / "TINY0.pt"))
    assert code == 0
    assert_matches_reference(tmp_path, tiny_dir)


def test_wav_voice_reproduces_the_reference(tmp_path, tiny_dir):
    # The reference measured the WAV voice and the .pt made from it to give identical outputs.
    code, _ = offline(tmp_path, tiny_dir, "--voice", str(tiny_dir / "voices" / "TINY0.wav"))
    assert code == 0
    assert_matches_reference(tmp_path, tiny_dir)


def test_saved_voice_reproduces_the_reference(tmp_path, tiny_dir):
    from engine.voices import load_pt_voice, save_voice

    saved = save_voice(load_pt_voice(tiny_dir / "voices" / "TINY0.pt"), tmp_path / "v.safetensors")
    code, _ = offline(tmp_path, tiny_dir, "--voice", str(saved))
    assert code == 0
    assert_matches_reference(tmp_path, tiny_dir)


def test_voice_by_name_and_prompt_text(tmp_path, tiny_dir):
    from engine.personas import TEACHER_PROMPT

    code, _ = offline(tmp_path, tiny_dir, "--voice", "TINY0", "--prompt", TEACHER_PROMPT)
    assert code == 0
    assert_matches_reference(tmp_path, tiny_dir)


def test_empty_prompt_runs_with_no_text_frames(tmp_path, tiny_dir):
    # The reference crashes on an empty prompt; we run the two spacers back to back.
    code, out = offline(tmp_path, tiny_dir, "--voice", "TINY0", "--prompt", "")
    assert code == 0
    pcm, sr = sf.read(out)
    assert pcm.shape == (183098,)
    tokens = np.load(tmp_path / "tokens.npz")["out_tokens"]
    assert tokens[0, 0] == 3  # the first frame is still the last (forced) spacer frame
    ref = np.load(tiny_dir / REF / "tokens.npz")["out_tokens"]
    assert not np.array_equal(tokens, ref)  # the prompt changes what the model says


def test_96khz_stereo_input_is_resampled_and_downmixed(tmp_path, tiny_dir):
    pcm, sr = sf.read(tiny_dir / "input.wav", dtype="float32")
    t = np.arange(len(pcm) * 4) / 96000
    hi = np.interp(t, np.arange(len(pcm)) / 24000, pcm).astype(np.float32)
    stereo = np.stack([hi, 0.5 * hi], axis=1)
    src = tmp_path / "in96.wav"
    sf.write(src, stereo, 96000, subtype="FLOAT")
    code, out = offline(tmp_path, tiny_dir, "--voice", "TINY0", input_wav=src)
    assert code == 0
    got, sr_out = sf.read(out)
    assert sr_out == 24000 and got.ndim == 1 and got.shape == (len(pcm),)


def test_flac_input_is_accepted(tmp_path, tiny_dir):
    pcm, _ = sf.read(tiny_dir / "input.wav", dtype="float32")
    src = tmp_path / "in.flac"
    sf.write(src, pcm[:24000], 24000)
    code, out = offline(tmp_path, tiny_dir, "--voice", "TINY0", input_wav=src)
    assert code == 0 and sf.read(out)[0].shape == (24000,)


@pytest.mark.parametrize("kind", ["empty", "not_audio", "missing"])
def test_bad_input_files_are_one_clear_sentence(tmp_path, tiny_dir, capsys, kind):
    src = tmp_path / "in.wav"
    if kind == "empty":
        sf.write(src, np.zeros(0, np.float32), 24000)
    elif kind == "not_audio":
        src.write_text("this is not audio at all\n" * 20)
    code, out = offline(tmp_path, tiny_dir, "--voice", "TINY0", input_wav=src)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and len([l for l in err.splitlines() if l.strip()]) == 1
    assert not out.exists() and not (tmp_path / "out.json").exists()


def test_truncated_pt_voice_is_refused_and_nothing_is_written(tmp_path, tiny_dir, capsys):
    data = (tiny_dir / "voices" / "TINY0.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    code, out = offline(tmp_path, tiny_dir, "--voice", str(bad))
    err = capsys.readouterr().err
    assert code != 0 and "bad.pt" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_voice_lists_the_available_ones(tmp_path, tiny_dir, capsys):
    code, _ = offline(tmp_path, tiny_dir, "--voice", "NOSUCH")
    err = capsys.readouterr().err
    assert code != 0 and "TINY0" in err


def test_missing_output_folder_is_clear(tmp_path, tiny_dir, capsys):
    code = main(["offline", "--model", str(tiny_dir), "--voice", "TINY0", "--input",
                 str(tiny_dir / "input.wav"), "--output", str(tmp_path / "no" / "out.wav")])
    assert code != 0 and "does not exist" in capsys.readouterr().err
