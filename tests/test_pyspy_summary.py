"""scripts/pyspy_summary.py: reading a py-spy raw profile (the `pyspy` phase of bench_gpu.sh)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import pyspy_summary  # noqa: E402


def test_it_counts_innermost_frames_of_the_stacks_within_a_function(tmp_path):
    raw = tmp_path / "frames.txt"
    raw.write_text(
        "thread (7): MainThread;main (a.py:1);DuplexEngine.step (engine/duplex.py:300);"
        "eval (engine/lm/lmgen.py:12);mlx::core::eval_impl (libmlx.so) 6\n"
        "thread (7);main (a.py:1);DuplexEngine.step (engine/duplex.py:300);"
        "step_live (engine/lm/lmgen.py:40) 2\n"
        "thread (7);main (a.py:1);load (engine/duplex.py:10) 50\n"  # outside the step: left out
        "thread (9): worker;run (engine/duplex.py:90);pthread_cond_wait (libc.so.6) 4\n"
        "garbage line\n")
    stacks = pyspy_summary.parse(str(raw))
    assert len(stacks) == 4
    lines = pyspy_summary.summarize(stacks, "DuplexEngine.step", top=5)
    assert lines[0] == "== thread 7: 8 samples within 'DuplexEngine.step'"
    assert "     75.0%  eval (engine/lm/lmgen.py:12)" in lines
    assert "     25.0%  step_live (engine/lm/lmgen.py:40)" in lines
    assert "     75.0%  mlx::core::eval_impl (libmlx.so)" in lines
    assert not any("thread 9" in line for line in lines)
    worker = pyspy_summary.summarize(stacks, "run (engine/duplex.py", top=5)
    assert worker[0] == "== thread 9: 4 samples within 'run (engine/duplex.py'"
    assert "    100.0%  (no Python frame)" not in worker and "    100.0%  run (engine/duplex.py:90)" in worker
