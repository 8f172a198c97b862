"""`parley run` drives the live session (model thread, file backend) from the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import soundfile as sf


def test_parley_run_with_files(tmp_path, tiny_dir):
    out = tmp_path / "run.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "tui.cli", "run", "--model", str(tiny_dir), "--voice", "TINY0",
         "--input", str(tiny_dir / "input.wav"), "--output", str(out), "--fast",
         "--record", str(tmp_path / "rec")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    assert "frames in" in proc.stderr
    assert "SPEAKING" in proc.stderr or "LISTENING" in proc.stderr or "STOPPED" in proc.stderr
    pcm, sr = sf.read(out)
    assert sr == 24000 and pcm.shape == (183098,) and np.abs(pcm).max() > 0.01
    assert any((tmp_path / "rec").iterdir())


def test_parley_run_with_a_missing_input_is_clear(tmp_path, tiny_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tui.cli", "run", "--model", str(tiny_dir), "--input",
         str(tmp_path / "nope.wav"), "--output", str(tmp_path / "o.wav")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nope.wav does not exist" in proc.stderr


def test_parley_run_with_an_unknown_voice_says_so_and_fails(tmp_path, tiny_dir):
    """The persona's prefill fails on the model thread: the run stops with that sentence and a
    non-zero exit (it used to end with "0 frames" and exit 0)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tui.cli", "run", "--model", str(tiny_dir), "--voice", "NOPE",
         "--input", str(tiny_dir / "input.wav"), "--output", str(tmp_path / "o.wav"), "--fast"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("parley: ") and "NOPE" in last and "available voices" in last
    assert " at voices.py" not in last  # a person's sentence, not a code location
