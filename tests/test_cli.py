"""The `parley` command: help, doctor, and clear one-sentence errors for bad models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tui.cli import COMMANDS

SUBCOMMANDS = ("tui", "offline", "run", "bench", "models", "personas", "devices", "doctor")


def parley_exe() -> list[str]:
    exe = shutil.which("parley") or str(Path(sysconfig.get_path("scripts")) / "parley")
    assert Path(exe).exists(), "the `parley` console script is not installed"
    return [exe]


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([*parley_exe(), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def assert_clear_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_subcommand():
    proc = run("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in proc.stdout
    assert set(COMMANDS) == set(SUBCOMMANDS)


def test_each_subcommand_has_help():
    for name in SUBCOMMANDS:
        proc = run(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr)
        assert f"usage: parley {name}" in proc.stdout


def test_doctor_reports_this_machine_truthfully():
    import mlx.core as mx

    proc = run("doctor")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert f"Python │ ok │ {sys.version.split()[0]}" in out
    assert f"default device {mx.default_device()}" in out
    has_gpu = mx.metal.is_available() or mx.cuda.is_available()
    assert ("no GPU backend" in out) == (not has_gpu)
    cuda = mx.cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu
    assert ("fused CUDA kernels" in out) == cuda and ("encode overlapped" in out) == cuda
    assert "Frame path" in out
    try:
        import sounddevice as sd

        devices = sd.query_devices()
        n_in = sum(d["max_input_channels"] > 0 for d in devices)
        n_out = sum(d["max_output_channels"] > 0 for d in devices)
    except OSError:
        assert "PortAudio library is missing" in out
        return
    if n_in == 0 and n_out == 0:
        assert "no sound devices found" in out
    else:
        assert f"Microphones │ {'ok' if n_in else 'warn'} │" in out
        assert f"Speakers │ {'ok' if n_out else 'warn'} │" in out
    assert "HF token" in out and os.environ.get("HF_TOKEN", "\0") not in out


def test_doctor_never_prints_the_token():
    proc = run("doctor", env={"HF_TOKEN": "hf_secretsecretsecret"})
    assert proc.returncode == 0
    assert "hf_secretsecretsecret" not in proc.stdout
    assert "set (not shown)" in " ".join(proc.stdout.split())


def test_offline_with_a_missing_directory_is_one_clear_sentence(tmp_path):
    proc = run("offline", "--model", "/nonexistent", "--input", "in.wav", "--output",
               str(tmp_path / "out.wav"))
    assert_clear_error(proc, "/nonexistent does not exist")
    assert not (tmp_path / "out.wav").exists()


def test_repo_id_without_network_is_one_clear_sentence(tmp_path):
    # Offline mode with an empty cache, and a hub endpoint that refuses connections.
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        env = {"HF_HOME": str(tmp_path / "hf"), **extra}
        proc = run("models", "path", "someone/some-model", env=env)
        assert_clear_error(proc, "someone/some-model")
        assert "network" in proc.stderr or "cannot be reached" in proc.stderr


def test_directory_without_model_safetensors_is_one_clear_sentence(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("model.safetensors", "reference"))
    proc = run("offline", "--model", str(broken), "--input", str(tiny_dir / "input.wav"),
               "--output", str(tmp_path / "out.wav"))
    assert_clear_error(proc, "model.safetensors is missing")


def test_a_file_given_as_model_directory(tmp_path, tiny_dir):
    proc = run("models", "path", str(tiny_dir / "config.json"))
    assert_clear_error(proc, "is a file, not a model directory")


def test_bad_config_is_one_clear_sentence(tmp_path, tiny_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad, ignore=shutil.ignore_patterns("reference"))
    (bad / "config.json").write_text('{"lm": {"dim": "x"}}')
    proc = run("models", "path", str(bad))
    assert_clear_error(proc, "'lm.dim' must be an integer")


def test_models_path_resolves_a_local_directory(tiny_dir):
    proc = run("models", "path", str(tiny_dir))
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(tiny_dir.resolve())


@pytest.mark.parametrize("argv", [["devices"], ["models", "list"]])
def test_informational_commands_succeed(argv, tmp_path):
    proc = run(*argv, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_gated_repo_without_token_says_how_to_get_access(tmp_path):
    from tests.hub_stub import hub_answering

    with hub_answering(401, "GatedRepo", "Access to model nvidia/personaplex-7b-v1 is restricted") as url:
        proc = run("models", "download", env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": url})
    assert_clear_error(proc, "gated", "HF_TOKEN", "huggingface.co/nvidia/personaplex-7b-v1")


def test_unknown_repo_is_one_clear_sentence(tmp_path):
    from tests.hub_stub import hub_answering

    with hub_answering(404, "RepoNotFound", "Repository not found") as url:
        proc = run("models", "path", "nobody/nothing", env={"HF_HOME": str(tmp_path / "hf"),
                                                            "HF_ENDPOINT": url})
    assert_clear_error(proc, "nobody/nothing")


def test_out_of_memory_is_one_clear_sentence(monkeypatch, capsys):
    import tui.cli as cli

    def boom(command, args):
        raise RuntimeError("[metal::malloc] Attempting to allocate 17179869184 bytes")

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "--quantize 4" in err


def test_float32_means_full_float32(tiny_dir, tmp_path, monkeypatch):
    """--dtype float32 turns off MLX's TF32 products (newer MLX enables them by default on
    M5/NVIDIA hardware) unless the user set MLX_ENABLE_TF32 themselves."""
    from tui.cli import main
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert main(["bench", "--model", str(tiny_dir), "--frames", "2", "--warmup", "1",
                 "--dtype", "float32"]) == 0
    assert os.environ.get("MLX_ENABLE_TF32") == "0"
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    assert main(["bench", "--model", str(tiny_dir), "--frames", "2", "--warmup", "1",
                 "--dtype", "float32"]) == 0
    assert os.environ["MLX_ENABLE_TF32"] == "1"


def test_doctor_reports_the_converted_weights_cache():
    """Where quantized conversions are kept and how much they take (PARLEY_CACHE_DIR/lm)."""
    import shutil
    import tempfile
    from pathlib import Path
    tmp_path = Path(tempfile.mkdtemp(prefix="pc"))  # short: the table must not wrap the path
    env = {"PARLEY_CACHE_DIR": str(tmp_path)}
    out = " ".join(run("doctor", env=env).stdout.split())
    assert f"Converted weights │ info │ {tmp_path / 'lm'} (empty;" in out
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "lm-a.safetensors").write_bytes(b"\0" * 1_500_000)
    (tmp_path / "lm" / "lm-b.safetensors").write_bytes(b"\0" * 500_000)
    out = " ".join(run("doctor", env=env).stdout.split())
    assert f"{tmp_path / 'lm'}: 2 files, 2.0 MB" in out
    shutil.rmtree(tmp_path)
