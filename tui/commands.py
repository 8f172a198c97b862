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
    from engine.personas import list_personas

    personas = list_personas()
    table = Table(title="Personas (`--persona NAME`)")
    table.add_column("name")
    table.add_column("voice")
    table.add_column("source")
    table.add_column("prompt", overflow="fold")
    for p in personas:
        prompt = p.prompt if len(p.prompt) <= 160 else p.prompt[:157] + "..."
        table.add_row(p.name, p.voice, p.source, prompt)
    console = Console()
    console.print(table)
    if args.model:
        from engine.model_dir import resolve_model
        from engine.voices import ensure_voices_unpacked, list_voices

        model = resolve_model(args.model)
        ensure_voices_unpacked(model.path)
        console.print(f"Voices of {model.source}: {', '.join(list_voices(model.path)) or 'none'}")
    from engine.personas import persona_dirs

    console.print("Your personas are TOML files in: " + ", ".join(str(d) for d in persona_dirs()))
    return 0


def persona_from_args(args, model_dir=None):
    """The persona that --persona / --voice / --prompt describe (MODEL.md §7)."""
    import dataclasses

    from engine.personas import DEFAULT_PERSONA, get_persona

    persona = get_persona(args.persona or DEFAULT_PERSONA)
    changes = {}
    if args.voice:
        changes["voice"] = args.voice
    if args.prompt is not None:
        changes["prompt"] = args.prompt
    if changes:
        persona = dataclasses.replace(persona, name=persona.name if args.persona else "custom",
                                      **changes)
    if model_dir is not None and model_dir.is_tiny_random and not args.voice:
        from engine.voices import ensure_voices_unpacked, list_voices

        ensure_voices_unpacked(model_dir.path)
        voices = list(list_voices(model_dir.path))
        if persona.voice not in voices and voices:  # tiny models ship their own voice
            persona = dataclasses.replace(persona, voice=voices[0])
    return persona


def run_offline(args) -> int:
    import time
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from engine.audiofile import read_audio
    from engine.duplex import DuplexEngine
    from engine.errors import ParleyError
    from engine.model_dir import resolve_model
    from engine.offline import run_offline as run, stage_summary, write_outputs

    for flag, value in (("--output", args.output), ("--text", args.text), ("--tokens", args.tokens)):
        if value and not Path(value).parent.exists():
            raise ParleyError(f"The folder for {flag} {value} does not exist; create it first.")
    model = resolve_model(args.model)
    pcm = read_audio(args.input, target_sr=model.config.mimi.sample_rate, mono="mix")
    if pcm.shape[0] == 0:
        raise AudioError(f"{args.input} holds no audio samples; give a file with speech in it.")
    console = Console(stderr=True)
    t0 = time.perf_counter()
    engine = DuplexEngine.load(model, quantize=args.quantize, dtype=args.dtype,
                               greedy=args.greedy, seed=args.seed,
                               kv_bits=getattr(args, "kv_bits", "auto"))
    load_s = time.perf_counter() - t0
    persona = persona_from_args(args, model)
    label = model.source + (" (random weights)" if model.is_tiny_random else "")
    console.print(f"Model {label}, persona {persona.name} (voice {persona.voice}), "
                  f"{pcm.shape[0] / model.config.mimi.sample_rate:.1f} s of input")
    show = console.is_terminal and pcm.shape[0] > 10 * model.config.mimi.sample_rate
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} frames"),
                  TimeRemainingColumn(), console=console, disable=not show) as progress:
        task = progress.add_task("Talking", total=None)

        def on_frame(done, total):
            progress.update(task, completed=done, total=total)

        result = run(engine, persona, pcm, on_frame=on_frame)
    write_outputs(result, Path(args.output), Path(args.text) if args.text else None,
                  Path(args.tokens) if args.tokens else None, model.config.mimi.sample_rate)
    stages = stage_summary(result.stage_ms)
    table = Table(title="Per-stage timing (ms per 80 ms frame)")
    for col in ("stage", "p50", "p95", "max"):
        table.add_column(col)
    for name, st in stages.items():
        table.add_row(name, f"{st['p50_ms']:.2f}", f"{st['p95_ms']:.2f}", f"{st['max_ms']:.2f}")
    console.print(table)
    console.print(f"Load {load_s:.2f} s, prefill {result.prefill_s * 1000:.0f} ms, "
                  f"{result.frames} frames in {result.wall_s:.2f} s: real-time factor "
                  f"{result.real_time_factor:.3f} ({'faster' if result.real_time_factor < 1 else 'slower'} "
                  f"than real time). Wrote {args.output}"
                  + (f", {args.text}" if args.text else "") + (f", {args.tokens}" if args.tokens else "") + ".")
    return 0


def run_live(args) -> int:
    """`parley run`: the live session without the dashboard, on files or the sound devices."""
    from pathlib import Path

    from engine.duplex import DuplexEngine
    from engine.errors import ParleyError
    from engine.model_dir import resolve_model
    from engine.session.headless import run_headless

    if args.output and not Path(args.output).resolve().parent.exists():
        raise ParleyError(f"The folder for --output {args.output} does not exist; create it first.")
    if args.input and not Path(args.input).is_file():
        raise AudioError(f"{args.input} does not exist; give a WAV or FLAC file as --input.")
    model = resolve_model(args.model)
    persona = persona_from_args(args, model)
    label = model.source + (" (random weights)" if model.is_tiny_random else "")

    def build():  # runs on the session's model thread, which owns every MLX array
        return DuplexEngine.load(model, quantize=args.quantize, dtype=args.dtype,
                                 greedy=args.greedy, seed=args.seed,
                                 kv_bits=getattr(args, "kv_bits", "auto"))

    print(f"parley run: {label}, persona {persona.name} (voice {persona.voice}); "
          f"{'input ' + args.input if args.input else 'microphone'} -> "
          f"{'output ' + args.output if args.output else 'speaker'}. Ctrl-C stops.",
          file=sys.stderr)
    result = run_headless(build, input_wav=args.input, output_wav=args.output,
                          realtime=not args.fast, record_dir=args.record, persona=persona,
                          persona_name=persona.name, echo_mode=args.echo,
                          input_device=_device(args.input_device),
                          output_device=_device(args.output_device))
    snap = result.snapshot
    if result.error or snap.state == "ERROR":
        raise ParleyError(result.error or snap.message or "The session stopped with an error.")
    print(f"parley run: {result.frames} frames in {result.seconds:.1f} s"
          + (f"; wrote {result.output_wav}" if result.output_wav else "")
          + (f"; recording in {result.record_dir}" if result.record_dir else "") + ".",
          file=sys.stderr)
    return 0


def _device(value):
    if value is None:
        return None
    return int(value) if str(value).isdigit() else value


def run_bench(args) -> int:
    from engine.bench import bench_command

    return bench_command(args)


def run_tui(args) -> int:
    from tui.dashboard_cli import run_dashboard

    return run_dashboard(args)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
