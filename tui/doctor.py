"""`parley doctor`: what this machine can do, stated truthfully, with a fix for each problem."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from engine import system
from engine.config import parse_model_config
from engine.errors import ParleyError

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
_STYLE = {OK: "green", WARN: "yellow", FAIL: "red", INFO: "cyan"}


@dataclass(frozen=True)
class Check:
    area: str
    status: str
    detail: str


def gather(model: str | None = None) -> list[Check]:
    checks = [Check("Python", OK if sys.version_info >= (3, 10) else FAIL,
                    f"{sys.version.split()[0]} ({sys.executable})")]
    checks.append(Check("Platform", INFO, system.platform_summary()))
    checks.extend(_mlx_checks())
    checks.extend(_audio_checks())
    checks.extend(_memory_checks(model))
    checks.extend(_hub_checks())
    checks.extend(_terminal_checks())
    return checks


def _mlx_checks() -> list[Check]:
    info = system.mlx_info()
    if info.error:
        return [Check("MLX", FAIL, f"cannot import mlx ({info.error}); reinstall with "
                                   "`pip install --force-reinstall parley`")]
    if info.gpu_backend:
        detail = f"{info.version}, default device {info.default_device} ({info.gpu_backend})"
        return [Check("MLX", OK, detail), _frame_path_check(), *_kernel_cache_check()]
    detail = (f"{info.version}, default device {info.default_device}: no GPU backend, so the 7B "
              "model will not run in real time here (use --model tiny, or a Mac with Apple silicon)")
    return [Check("MLX", WARN, detail), _frame_path_check()]


def _frame_path_check() -> Check:
    """How a live frame will run here: the transformers' CUDA kernels and the overlapped encode
    are chosen by backend (docs/benchmarks.md)."""
    import os

    from engine.duplex import default_overlap_encode
    from engine.lm import fused
    if fused.enabled():
        temporal = ("temporal transformer in MLX operations (PARLEY_FUSED_TEMPORAL=0 is set)"
                    if os.environ.get("PARLEY_FUSED_TEMPORAL") == "0"
                    else "temporal transformer in fused CUDA kernels"
                    + ("" if os.environ.get("PARLEY_RING_ATTENTION") == "0" else " with ring attention"))
        if os.environ.get("PARLEY_FUSED_SAMPLING") != "0":
            temporal += ", top-k draws one kernel each"
        depth = ("depth transformer in CUDA kernels, one a step where the model allows "
                 f"(PARLEY_FUSED=0 turns them all off); {temporal}")
    elif os.environ.get("PARLEY_FUSED") == "0":
        depth = "transformers in MLX operations (PARLEY_FUSED=0 is set)"
    else:
        depth = "transformers in MLX operations"
    from engine.lm.lmgen import default_early_submit
    encode = ("Mimi's encode overlapped with the LM step" if default_overlap_encode()
              else "Mimi's encode before the LM step")
    if default_early_submit():
        encode += "; each stage handed to the device as soon as it is built"
    from engine.lm.lmgen import default_presubmit
    if default_presubmit():
        encode += ("; the next frame's temporal step handed over as each frame ends "
                   "(PARLEY_PRESUBMIT=0 turns it off)")
    from engine.mimi import transformer_kernel
    if transformer_kernel.enabled():
        encode += "; Mimi's transformers in CUDA kernels (PARLEY_MIMI_KERNEL=0 turns them off)"
    return Check("Frame path", INFO, f"{depth}; {encode}")


def _kernel_cache_check() -> list[Check]:
    """Where compiled CUDA kernels are kept (set by the `parley` command; engine/kernel_cache.py)."""
    from engine.kernel_cache import describe
    from engine.lm import fused
    where = describe()
    if not fused.enabled() or where is None:
        return []
    return [Check("Kernel cache", INFO, f"{where}; the first prefill after it is emptied takes "
                                        "1-2 minutes to compile")]


def _audio_checks() -> list[Check]:
    try:
        import sounddevice as sd
    except OSError:
        fix = ("install it with `sudo apt-get install libportaudio2`" if sys.platform.startswith("linux")
               else "reinstall sounddevice")
        return [Check("Audio", FAIL, f"the PortAudio library is missing; {fix}. File input and "
                                     "output (--input/--output) still work")]
    except Exception as exc:
        return [Check("Audio", FAIL, f"sounddevice failed to load ({exc})")]
    checks = [Check("PortAudio", OK, sd.get_portaudio_version()[1])]
    try:
        devices = sd.query_devices()
    except Exception as exc:
        return checks + [Check("Audio devices", FAIL, f"cannot list devices ({exc})")]
    ins = [d for d in devices if d["max_input_channels"] > 0]
    outs = [d for d in devices if d["max_output_channels"] > 0]
    if not ins and not outs:
        checks.append(Check("Audio devices", WARN,
                            "no sound devices found (no sound card?); use --input/--output WAV files"))
        return checks
    for label, found, kind in (("Microphones", ins, "input"), ("Speakers", outs, "output")):
        default = _default_name(sd, kind)
        names = ", ".join(d["name"] for d in found[:6]) + (" ..." if len(found) > 6 else "")
        status = OK if found else WARN
        detail = f"{len(found)}: {names}" if found else f"no {kind} device"
        if default:
            detail += f" (default: {default})"
        checks.append(Check(label, status, detail))
    return checks


def _default_name(sd, kind: str) -> str | None:
    try:
        return sd.query_devices(kind=kind)["name"]
    except Exception:
        return None


def _memory_checks(model: str | None) -> list[Check]:
    total = system.total_memory_bytes()
    avail = system.available_memory_bytes()
    gb = system.GB
    checks = [Check("Memory", INFO,
                    f"{_gb(total)} total, {_gb(avail)} available")]
    cfg, label = _model_config(model)
    if cfg is None:
        checks.append(Check("Model memory", WARN, label))
        return checks
    for bits, name in ((None, "bf16"), (8, "8-bit"), (4, "4-bit")):
        need = system.estimate_model_bytes(cfg.lm, cfg.mimi, bits)
        if avail is None:
            status = INFO
        else:
            status = OK if avail >= need * 1.1 else (WARN if avail >= need else FAIL)
        checks.append(Check(f"{label} {name}", status,
                            f"needs about {need / gb:.1f} GB"
                            + ("" if status in (OK, INFO) else "; more than is available now")))
    return checks


def _model_config(model: str | None):
    if model is None:
        return parse_model_config({}), "PersonaPlex-7B"
    try:
        from engine.model_dir import resolve_model

        resolved = resolve_model(model, progress=False, offline=True)
        return resolved.config, os.path.basename(str(resolved.path)) or model
    except ParleyError as exc:
        return None, str(exc)


def _hub_checks() -> list[Check]:
    try:
        from huggingface_hub import constants, get_token
    except Exception as exc:
        return [Check("Hugging Face", FAIL, f"huggingface_hub missing ({exc})")]
    token = get_token() is not None
    offline = bool(constants.HF_HUB_OFFLINE)
    from engine.model_dir import cached_models

    cached = cached_models()
    names = ", ".join(repo for repo, _, _ in cached) or "no Parley model downloaded yet"
    checks = [Check("HF cache", INFO, f"{constants.HF_HUB_CACHE} ({names})"),
              Check("HF token", OK if token else WARN,
                    "set (not shown)" if token else
                    "not set; nvidia/personaplex-7b-v1 is gated: accept its licence on "
                    "huggingface.co and set HF_TOKEN before the first download")]
    if offline:
        checks.append(Check("HF offline", INFO, "HF_HUB_OFFLINE is set: only cached models load"))
    checks.append(_converted_cache_check())
    return checks


def _converted_cache_check() -> Check:
    """Where quantized conversions of the model are kept, and how much space they take."""
    from engine.lm.model import converted_cache_usage
    folder, n, size = converted_cache_usage()
    if not n:
        return Check("Converted weights", INFO, f"{folder} (empty; the first quantized load "
                                                "fills it, so later starts skip the conversion)")
    return Check("Converted weights", INFO,
                 f"{folder}: {n} file{'s' if n != 1 else ''}, "
                 + (f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB")
                 + " (entries a "
                 "newer one makes useless are removed; delete the folder to free the space, "
                 "the next start converts again)")


def _terminal_checks() -> list[Check]:
    console = Console()
    term = os.environ.get("TERM", "(unset)")
    colorterm = os.environ.get("COLORTERM", "(unset)")
    system_name = console.color_system or "none"
    tty = sys.stdout.isatty()
    ssh = bool(os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY"))
    detail = (f"colours: {system_name} (TERM={term}, COLORTERM={colorterm}); "
              f"{'a terminal' if tty else 'not a terminal'}"
              f"{', over SSH' if ssh else ''}; size {console.size.width}x{console.size.height}")
    status = OK if system_name in ("truecolor", "256") else (WARN if tty else INFO)
    checks = [Check("Terminal", status, detail)]
    if status == WARN:
        checks.append(Check("Terminal hint", INFO, "use `--theme ansi` for terminals with few colours"))
    return checks


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / system.GB:.1f} GB"


def run_doctor(args) -> int:
    checks = gather(getattr(args, "model", None))
    console = Console()
    table = Table(title="parley doctor", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.area, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail)
    console.print(table)
    return 1 if any(c.status == FAIL and c.area in ("Python", "MLX") for c in checks) else 0
