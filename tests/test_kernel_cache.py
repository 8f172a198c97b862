"""engine/kernel_cache.py: the CUDA kernel cache goes under ~/.cache unless the user chose."""

from __future__ import annotations

import sys

from engine import kernel_cache


def test_the_cache_goes_under_the_users_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    path = kernel_cache.use_persistent_cache()
    assert path == tmp_path / "parley" / "mlx-ptx" / kernel_cache._mlx_version()
    assert path.is_dir()
    import os
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(path)
    (path / "k.ptx").write_text("x" * 1000)
    assert kernel_cache.describe() == f"{path} (1 files, 0.0 MB)"


def test_a_users_choice_stands(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mine"))
    assert kernel_cache.use_persistent_cache() == tmp_path / "mine"
    import os
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "mine")


def test_nothing_is_set_on_macos_or_where_the_dir_cannot_be_made(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert kernel_cache.use_persistent_cache() is None
    monkeypatch.setattr(sys, "platform", "linux")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where a directory should be
    assert kernel_cache.use_persistent_cache() is None
    import os
    assert "MLX_PTX_CACHE_DIR" not in os.environ


def test_the_parley_command_sets_it(tmp_path, monkeypatch, capsys):
    from tui.cli import main
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["personas"]) == 0
    import os
    assert os.environ["MLX_PTX_CACHE_DIR"].startswith(str(tmp_path / "parley" / "mlx-ptx"))


def test_the_doctor_shows_it_where_cuda_kernels_run(tmp_path, monkeypatch):
    from engine.lm import fused
    from tui import doctor
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    assert doctor._kernel_cache_check() == []  # this CPU: nothing is compiled there
    monkeypatch.setattr(fused, "enabled", lambda: True)
    (check,) = doctor._kernel_cache_check()
    assert check.area == "Kernel cache" and str(tmp_path) in check.detail
    detail = doctor._frame_path_check().detail
    assert "temporal transformer in fused CUDA kernels with ring attention" in detail
    assert "top-k draws one kernel each" in detail
    assert "Mimi's transformers" not in detail  # the tests keep Mimi's kernels off where CUDA is stood in for
    monkeypatch.delenv("PARLEY_MIMI_KERNEL", raising=False)
    assert "Mimi's transformers in CUDA kernels" in doctor._frame_path_check().detail
    monkeypatch.setenv("PARLEY_RING_ATTENTION", "0")
    monkeypatch.setenv("PARLEY_FUSED_SAMPLING", "0")
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "1")
    detail = doctor._frame_path_check().detail
    assert "ring attention" not in detail and "top-k" not in detail
    assert "handed to the device as soon as it is built" in detail
