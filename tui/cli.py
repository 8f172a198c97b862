"""The `parley` command: argument parsing and dispatch to the subcommands.

Imports are lazy so that `parley --help` is instant and a subcommand only pays for what it uses.
Every ParleyError becomes one sentence on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.errors import NotYetAvailable, ParleyError

COMMANDS = ("tui", "offline", "run", "bench", "models", "personas", "devices", "doctor")
DEFAULT_MODEL_HELP = (
    "a local model directory, a Hugging Face repo id (default nvidia/personaplex-7b-v1), "
    "or 'tiny' for a small random-weights model"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR|REPO|tiny", help=DEFAULT_MODEL_HELP)
    p.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                   help="quantize the transformer weights to 4 or 8 bits while loading, or 0 for "
                        "none (default: 8 for the 7B model, none for small test models)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype (default: bfloat16; float32 for parity checks)")
    _add_kv_bits_arg(p)


def _kv_bits(value: str):
    if value == "auto":
        return "auto"
    if value in ("8", "16"):
        return int(value)
    raise argparse.ArgumentTypeError("choose auto, 8 or 16")


def _add_kv_bits_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=_kv_bits, default="auto", metavar="{auto,8,16}",
                   help="store the attention's KV cache in 8 bits (half its memory: 0.83 instead "
                        "of 1.57 GB for the 7B) or in the compute dtype (16); auto: 8 bits with "
                        "quantized weights, else 16")


def _add_persona_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--persona", default=None, help="persona name (see `parley personas`)")
    p.add_argument("--voice", default=None,
                   help="voice name, or a .pt, .wav/.flac or saved .safetensors voice file")
    p.add_argument("--prompt", default=None, help="role prompt text (overrides the persona's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")


def _add_live_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default=None, metavar="WAV",
                   help="read the user's side from a WAV/FLAC file instead of the microphone")
    p.add_argument("--output", default=None, metavar="WAV",
                   help="write the model's voice to a WAV file instead of the speaker")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="save mic, model output, a stereo mix and a JSONL of text and events")
    p.add_argument("--echo", choices=("aec", "headphones", "gate"), default="aec",
                   help="echo handling: WebRTC AEC3 (default), off for headphones, or a mic gate")
    p.add_argument("--input-device", default=None, help="input device name or index")
    p.add_argument("--output-device", default=None, help="output device name or index")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley",
        description="Talk to a full-duplex speech model (PersonaPlex-7B) on your own machine.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tui = sub.add_parser("tui", help="the live dashboard (the default when no command is given)")
    _add_model_args(tui)
    _add_persona_args(tui)
    _add_live_args(tui)
    tui.add_argument("--theme", default=None, help="dashboard theme: dark, light or ansi")
    tui.add_argument("--color", choices=("auto", "truecolor", "256", "16", "none"), default="auto",
                     help="colour depth to draw with")
    tui.add_argument("--low-bandwidth", action="store_true",
                     help="slower refresh and no animations, for slow SSH links")
    tui.add_argument("--fps", type=int, default=None, metavar="N",
                     help="cap on screen updates per second (Textual's TEXTUAL_FPS, default 60)")

    off = sub.add_parser("offline", help="WAV in -> the model's WAV and transcript out")
    _add_model_args(off)
    _add_persona_args(off)
    off.add_argument("--input", required=True, metavar="WAV", help="the user's side (WAV/FLAC)")
    off.add_argument("--output", required=True, metavar="WAV", help="the model's voice (WAV)")
    off.add_argument("--text", default=None, metavar="JSON", help="per-frame text pieces (JSON)")
    off.add_argument("--tokens", default=None, metavar="NPZ",
                     help="user codes, emitted tokens and decoded frames (NPZ)")

    run = sub.add_parser("run", help="a live session without the dashboard")
    _add_model_args(run)
    _add_persona_args(run)
    _add_live_args(run)
    run.add_argument("--fast", action="store_true",
                     help="with --input: run as fast as possible instead of real-time pace")

    bench = sub.add_parser("bench", help="time full frames and report per-stage latency")
    bench.add_argument("--model", default=None, metavar="DIR|REPO|tiny", help=DEFAULT_MODEL_HELP)
    bench.add_argument("--shape", choices=("personaplex-7b",), default=None,
                       help="benchmark a model of this shape instead of a model directory")
    bench.add_argument("--random-weights", action="store_true",
                       help="with --shape: use random weights (nothing downloaded)")
    bench.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                       help="weight bits (default: 8 for the 7B, none for small models)")
    _add_kv_bits_arg(bench)
    bench.add_argument("--warmup", type=int, default=10, help="untimed frames first")
    bench.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    bench.add_argument("--frames", type=int, default=100, help="frames to time after warm-up")
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bench.add_argument("--overlap-encode", action=argparse.BooleanOptionalAction, default=None,
                       help="encode each frame on a worker thread while the LM step is issued "
                       "(default: on with MLX's CUDA backend, off elsewhere)")
    bench.add_argument("--presubmit", action=argparse.BooleanOptionalAction, default=None,
                       help="hand each next frame's temporal step to the device as a frame ends "
                       "(default: on; PARLEY_PRESUBMIT=0 changes the default)")
    bench.add_argument("--paced-frames", type=int, default=25,
                       help="frames timed at real-time pace, one every 80 ms, for the latency "
                       "from a frame's audio to its output (at most --frames; 0: none)")
    bench.add_argument("--switch", action=argparse.BooleanOptionalAction, default=True,
                       help="last, start the persona again and time that prefill: what a persona "
                       "switch costs once compiled (default: on)")
    bench.add_argument("--context", choices=("full", "prompt"), default="full",
                       help="time frames attending over a full attention window (the steady "
                       "state of a long conversation; default) or right after the prompt")

    models = sub.add_parser("models", help="list, download or locate models")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.add_parser("list", help="models in the Hugging Face cache")
    dl = msub.add_parser("download", help="download a model into the Hugging Face cache")
    dl.add_argument("repo", nargs="?", default=None, help="repo id (default nvidia/personaplex-7b-v1)")
    mp = msub.add_parser("path", help="print the directory a --model value resolves to")
    mp.add_argument("model", nargs="?", default=None, help=DEFAULT_MODEL_HELP)

    per = sub.add_parser("personas", help="list the built-in and your own personas")
    per.add_argument("--model", default=None, help="also list the voices of this model directory")

    sub.add_parser("devices", help="list audio input and output devices")

    doc = sub.add_parser("doctor", help="check this machine: MLX, audio, memory, cache, terminal")
    doc.add_argument("--model", default=None, help="also check the memory this model needs")
    return parser


def _version() -> str:
    from engine import __version__

    return f"parley {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `parley [options]` is `parley tui [options]`.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["tui", *argv]
    args = parser.parse_args(argv)
    command = args.command
    # CUDA kernels compiled at run time are kept under ~/.cache, not /tmp (engine/kernel_cache.py).
    from engine.kernel_cache import use_persistent_cache
    use_persistent_cache()
    if getattr(args, "dtype", None) == "float32":
        # Asking for float32 means full float32: newer MLX otherwise runs float32 products as
        # TF32 where the hardware has it (Apple M5, NVIDIA). Read by MLX at its first product.
        os.environ.setdefault("MLX_ENABLE_TF32", "0")
    try:
        return int(_dispatch(command, args) or 0)
    except ParleyError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("parley: interrupted.", file=sys.stderr)
        return 130
    except MemoryError:
        print("parley: out of memory; close other programs or use a smaller --quantize "
              "(4 bits needs about 5.5 GB).", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except RuntimeError as exc:  # MLX reports allocation failures as RuntimeError
        if "malloc" in str(exc).lower() or "out of memory" in str(exc).lower():
            print("parley: out of memory while running the model; close other programs or use "
                  "--quantize 4 (about 5.5 GB).", file=sys.stderr)
            return 1
        if os.environ.get("PARLEY_DEBUG"):
            raise
        print(f"parley: internal error (RuntimeError: {exc}); rerun with PARLEY_DEBUG=1 for "
              "details and report it.", file=sys.stderr)
        return 70
    except Exception as exc:  # a bug: keep the message short; PARLEY_DEBUG=1 shows the traceback
        if os.environ.get("PARLEY_DEBUG"):
            raise
        print(f"parley: internal error ({type(exc).__name__}: {exc}); rerun with PARLEY_DEBUG=1 "
              "for details and report it.", file=sys.stderr)
        return 70


def _dispatch(command: str, args: argparse.Namespace) -> int:
    if command == "doctor":
        from tui.doctor import run_doctor

        return run_doctor(args)
    if command == "models":
        from tui.commands import run_models

        return run_models(args)
    if command == "devices":
        from tui.commands import run_devices

        return run_devices(args)
    if command == "personas":
        from tui.commands import run_personas

        return run_personas(args)
    if command == "offline":
        from tui.commands import run_offline

        return run_offline(args)
    if command == "run":
        from tui.commands import run_live

        return run_live(args)
    if command == "bench":
        from tui.commands import run_bench

        return run_bench(args)
    if command == "tui":
        from tui.commands import run_tui

        return run_tui(args)
    raise NotYetAvailable(f"`parley {command}` is not a command.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
