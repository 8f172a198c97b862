"""The subcommands other than the dashboard and the doctor."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from engine.errors import AudioError, NotYetAvailable


def run_models(args) -> int:
    from engine import model_dir

    action = args.models_command or "list"
    console = Console()
    if action == "list":
        found = model_dir.cached_models()
        table = Table(title="Models in the Hugging Face cache")
        table.add_column("repo")
        table.add_column("size")
        table.add_column("path", overflow="fold")
        for repo, path, size in found:
            table.add_row(repo, f"{size / 1e9:.1f} GB", str(path))
        console.print(table)
        if not found:
            console.print(f"No model downloaded yet: `parley models download` fetches "
                          f"{model_dir.DEFAULT_REPO} (gated: accept its licence and set HF_TOKEN). "
                          "`--model tiny` runs a small random-weights model with no download.")
        return 0
    if action == "download":
        path = model_dir.check_layout(model_dir.download_repo(args.repo or model_dir.DEFAULT_REPO),
                                      source=args.repo)
        print(path.path)
        return 0
    if action == "path":
        print(model_dir.resolve_model(args.model).path)
        return 0
    raise NotYetAvailable(f"`parley models {action}` is not an action; use list, download or path.")


def run_devices(args) -> int:
    try:
        import sounddevice as sd
    except OSError:
        raise AudioError("The PortAudio library is missing, so no sound device can be used; "
                         "install it (`sudo apt-get install libportaudio2` on Linux) or use "
                         "--input/--output WAV files.") from None
    devices = sd.query_devices()
    if len(devices) == 0:
        print("No sound devices found; use --input/--output WAV files instead.")
        return 0
    table = Table(title=f"Audio devices ({sd.get_portaudio_version()[1]})")
    for col in ("#", "name", "in", "out", "default rate", "host API"):
        table.add_column(col)
    default_in, default_out = sd.default.device
    apis = sd.query_hostapis()
    for i, d in enumerate(devices):
        mark = (" <in" if i == default_in else "") + (" <out" if i == default_out else "")
        table.add_row(str(i), d["name"] + mark, str(d["max_input_channels"]),
                      str(d["max_output_channels"]), f"{d['default_samplerate']:.0f}",
                      apis[d["hostapi"]]["name"])
    Console().print(table)
    return 0


def run_personas(args) -> int:
    raise NotYetAvailable("`parley personas` is not available yet: personas arrive with issue #5.")


def run_offline(args) -> int:
    from engine.model_dir import resolve_model

    resolve_model(args.model)  # model errors first: they are what the user can fix today
    raise NotYetAvailable("`parley offline` is not available yet: the offline pipeline arrives "
                          "with issue #5.")


def run_live(args) -> int:
    raise NotYetAvailable("`parley run` is not available yet: the live session arrives with issue #6.")


def run_bench(args) -> int:
    raise NotYetAvailable("`parley bench` is not available yet: it arrives with issue #8.")


def run_tui(args) -> int:
    raise NotYetAvailable("The dashboard is not available yet: it arrives with issue #7; "
                          "`parley --help` lists what works today.")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
