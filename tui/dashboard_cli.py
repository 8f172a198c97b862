"""`parley` / `parley tui`: builds the dashboard for the parsed arguments and runs it.

The dashboard is on screen at once; the model is resolved, loaded and the session started in a
thread worker (`_Starter`), which reports progress into the dashboard. Terminal settings
(`--color`, `--low-bandwidth`) become Textual's environment knobs before Textual is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

COLOR_SYSTEMS = {"truecolor": "truecolor", "256": "256", "16": "standard"}


def configure_terminal(color: str = "auto", low_bandwidth: bool = False,
                       environ: dict | None = None, fps: int | None = None) -> bool:
    """Sets TEXTUAL_COLOR_SYSTEM / NO_COLOR / TEXTUAL_ANIMATIONS for the chosen colour depth.

    Returns True when the link is low-colour (the ANSI theme is the better default then).
    Never forces TERM or COLORTERM (TUI.md §6). Must run before Textual is imported to take effect
    on the colour system; it also patches an already imported `textual.constants`.
    """
    env = os.environ if environ is None else environ
    color = (color or "auto").lower()
    system = COLOR_SYSTEMS.get(color)
    if low_bandwidth and system is None and color != "none":
        system = "256"  # no truecolor over a slow link (TUI.md §4)
    if system is not None:
        env["TEXTUAL_COLOR_SYSTEM"] = system
    if color == "none":
        env["NO_COLOR"] = "1"
    if low_bandwidth:
        env.setdefault("TEXTUAL_ANIMATIONS", "none")
    if fps is not None:  # Textual's screen update cap (default 60), TUI.md §4
        env["TEXTUAL_FPS"] = str(fps)
        if environ is None and "textual.constants" in sys.modules:
            sys.modules["textual.constants"].MAX_FPS = fps  # type: ignore[attr-defined]
    if environ is None and system is not None and "textual.constants" in sys.modules:
        sys.modules["textual.constants"].COLOR_SYSTEM = system  # type: ignore[attr-defined]
    return color in ("256", "16", "none")


def model_label(spec: str | None, quantize: int | None, dtype: str | None,
                random_weights: bool = False) -> str:
    """"PersonaPlex-7B q8", "tiny · random weights", "my-model bf16"."""
    if spec == "tiny":
        return "tiny · random weights"
    if spec is None or spec.rstrip("/").endswith("personaplex-7b-v1"):
        name = "PersonaPlex-7B"
    else:
        name = Path(spec.rstrip("/")).name or spec
    if quantize is None and name == "PersonaPlex-7B":
        quantize = 8  # the engine's default for the 7B (before the model has loaded)
    precision = f"q{quantize}" if quantize else ("fp32" if dtype == "float32" else "bf16")
    label = f"{name} {precision}"
    if random_weights:
        label += " · random weights"
    return label


def run_dashboard(args: Any) -> int:
    color = getattr(args, "color", "auto") or "auto"
    low_bandwidth = bool(getattr(args, "low_bandwidth", False))
    low_colour = configure_terminal(color, low_bandwidth, fps=getattr(args, "fps", None))

    from engine.personas import list_personas, scan_user_personas

    personas = list_personas(strict=False)
    problems = scan_user_personas()[1]

    from tui.app import ParleyApp

    starter = _Starter(args)
    app = ParleyApp(
        starter=starter,
        persona_resolver=starter.resolve,
        on_model_ready=starter.label_for,
        personas=personas,
        persona=starter.initial_persona_name(personas),
        model_label=model_label(getattr(args, "model", None), getattr(args, "quantize", None),
                                getattr(args, "dtype", None)),
        theme=getattr(args, "theme", None),
        preset="low-bandwidth" if low_bandwidth else "normal",
        low_colour=low_colour,
        save_dir=getattr(args, "record", None),
        probe_file=os.environ.get("PARLEY_UI_PROBE_FILE") or None,
        warnings=[str(problem) for problem in problems],
    )
    starter.app = app
    keymap = parse_keymap(os.environ.get("PARLEY_KEYS", ""))
    if keymap:
        app.set_keymap(keymap)
    rc = app.run()
    starter.shutdown(app)
    code = 0 if app.exit_reason == "terminal closed" else int(rc or 0)
    if code == 0 and (app.failed or app.last_state in ("ERROR", "NO AUDIO DEVICE")):
        code = 1  # the session never ran: the banner said why
    if app.loader_running or starter.started_session:
        # The terminal is restored, the session stopped, its files closed. What is left is
        # interpreter teardown, which can abort the process when MLX objects created on the
        # session's (finished) model thread are destroyed during finalization ("terminate called
        # without an active exception", ~1 run in 6 here), or hang on a thread worker that is
        # still loading weights (textual#3966; thread workers cannot be killed). Leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def parse_keymap(text: str) -> dict[str, str]:
    """`PARLEY_KEYS="mute-mic=M;interrupt=i,f5"` -> {"mute-mic": "M", "interrupt": "i,f5"}.

    Binding ids are those of `ParleyApp.BINDINGS` (the `?` help lists them with their keys).
    """
    keymap = {}
    for item in text.split(";"):
        name, sep, keys = item.partition("=")
        if sep and name.strip() and keys.strip():
            keymap[name.strip()] = keys.strip()
    return keymap


class _Starter:
    """Resolves the model, loads it, builds the session and starts it (in the app's worker).

    Runs on a worker thread: it talks to the app only through `progress` (post_message) and
    `call_from_thread` for the two rare label updates.
    """

    def __init__(self, args: Any):
        self.args = args
        self.app = None
        self.session = None
        self.voices: list[str] = []
        self.fallback_voice: str | None = None
        self.started_session = False

    def initial_persona_name(self, personas: list) -> str | None:
        want = getattr(self.args, "persona", None)
        if want:
            for p in personas:
                if p.matches(want):
                    return p.name
            return want
        from engine.personas import DEFAULT_PERSONA

        return DEFAULT_PERSONA

    def _ui(self, fn: Callable, *args: Any) -> None:
        app = self.app
        if app is not None:
            try:
                app.call_from_thread(fn, *args)
            except Exception:
                pass

    def __call__(self, progress: Callable[[str, float | None], None]) -> Any:
        """Runs on a worker thread: everything up to starting the session. The weights are
        loaded by the session's own model thread (a factory), where all MLX work stays."""
        from engine.model_dir import looks_like_repo_id
        from engine.voices import ensure_voices_unpacked, list_voices

        args = self.args
        spec = getattr(args, "model", None)
        if spec is None or (spec != "tiny" and looks_like_repo_id(spec)):
            progress("finding the model (the first time it is downloaded: about 17 GB)", None)
        elif spec == "tiny":
            progress("preparing the tiny random-weights model", None)
        else:
            progress("checking the model directory", None)
        model_dir = _resolve_with_progress(spec, progress)
        if model_dir.is_tiny_random:
            self._ui(self.app.set_model_label, model_label(spec, None, None, True)
                     if spec != "tiny" else model_label("tiny", None, None))

        progress("preparing the persona", None)
        ensure_voices_unpacked(model_dir.path)
        self.voices = list(list_voices(model_dir.path))
        if getattr(args, "voice", None) in self.voices:
            self.fallback_voice = args.voice
        elif self.voices:
            self.fallback_voice = self.voices[0]
        persona = self._persona()
        self._ui(self.app.set_voice, persona.name, persona.voice)
        for p in getattr(self.app, "personas", ()):
            resolved = self.resolve(p)
            if resolved.voice != p.voice:
                self._ui(self.app.set_voice, p.name, resolved.voice)

        progress("opening audio", None)
        backend = self._backend()
        from engine.duplex import DuplexEngine
        from engine.session import Session, SessionConfig

        quantize = getattr(args, "quantize", None)
        dtype = getattr(args, "dtype", None)
        greedy = bool(getattr(args, "greedy", False))
        seed = getattr(args, "seed", None)
        kv_bits = getattr(args, "kv_bits", "auto")

        def load_model():  # runs on the session's model thread
            return DuplexEngine.load(model_dir, quantize=quantize, dtype=dtype, greedy=greedy,
                                     seed=seed, kv_bits=kv_bits)

        config = SessionConfig()
        if not isinstance(backend, _file_backend_type()):
            config.echo_mode = getattr(args, "echo", None)
        session = Session(load_model, backend, persona, config,
                          record_dir=getattr(args, "record", None), persona_name=persona.name)
        self.started_session = True
        session.start()
        self.session = session
        return session

    def label_for(self, model: Any) -> str:
        """The status strip's model label once the session's model thread has loaded it."""
        spec = getattr(self.args, "model", None)
        if spec == "tiny":
            return model_label("tiny", None, None)
        random = bool(getattr(getattr(model, "model_dir", None), "is_tiny_random", False))
        return model_label(spec, getattr(model, "quantize", None), getattr(model, "dtype", None),
                           random)

    def _persona(self) -> Any:
        from tui.commands import persona_from_args

        return self.resolve(persona_from_args(self.args, None))

    def resolve(self, persona: Any) -> Any:
        return resolve_voice(persona, self.voices, self.fallback_voice)

    def _backend(self) -> Any:
        args = self.args
        from engine.audio.backends import FileBackend, SoundDeviceBackend

        if getattr(args, "output", None) and not getattr(args, "input", None):
            from engine.errors import AudioError

            raise AudioError("--output writes the model's voice for a file conversation and needs "
                             "--input WAV (the user's side); leave both out to use the sound "
                             "devices.")
        if getattr(args, "input", None):
            return FileBackend(input_wav=getattr(args, "input", None),
                               output_wav=getattr(args, "output", None), realtime=True)
        return SoundDeviceBackend(input_device=_device(getattr(args, "input_device", None)),
                                  output_device=_device(getattr(args, "output_device", None)))

    def shutdown(self, app: Any) -> None:
        """Stops the session, then drops every reference to it and collects it here, while the
        interpreter is fully alive: MLX objects that survive into interpreter shutdown after
        their thread ended abort the process ("terminate called without an active exception")."""
        import gc

        link = getattr(app, "link", None)
        session = link.session if link is not None else self.session
        if session is not None:
            try:
                session.stop()
            except Exception:
                pass
        app.link = None
        self.session = None
        session = link = None
        gc.unfreeze()
        gc.collect()


DOWNLOAD_BYTES = 17.1e9  # what `parley models download` fetches for PersonaPlex-7B (approximate)


def _resolve_with_progress(spec: str | None, progress: Callable[[str, float | None], None]):
    """`resolve_model`, reporting download progress from the size of the Hugging Face cache.

    huggingface_hub writes its progress bars to the terminal the dashboard owns, so they are off;
    instead this thread watches the repo's blob folder grow while a helper thread downloads.
    """
    import threading

    from engine.model_dir import DEFAULT_REPO, looks_like_repo_id, resolve_model

    repo = spec or DEFAULT_REPO
    if spec == "tiny" or not looks_like_repo_id(repo):
        return resolve_model(spec, progress=False)
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["dir"] = resolve_model(spec, progress=False)
        except BaseException as exc:  # handed to the worker thread below
            result["error"] = exc

    helper = threading.Thread(target=fetch, name="parley-download", daemon=True)
    helper.start()
    blobs = _hub_cache() / ("models--" + repo.replace("/", "--")) / "blobs"
    start = _folder_bytes(blobs)
    while helper.is_alive():
        helper.join(1.0)
        done = _folder_bytes(blobs)
        if helper.is_alive() and done > start:
            progress(f"downloading {repo}: {done / 1e9:.1f} of about {DOWNLOAD_BYTES / 1e9:.0f} GB",
                     None)
        else:
            progress(f"finding {repo} (the first time it is downloaded: about "
                     f"{DOWNLOAD_BYTES / 1e9:.0f} GB)", None)
    if "error" in result:
        raise result["error"]
    return result["dir"]


def _hub_cache() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:
        return Path.home() / ".cache" / "huggingface" / "hub"


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(folder):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


def resolve_voice(persona: Any, voices: list[str], fallback: str | None = None) -> Any:
    """The persona with a voice the model has.

    The built-in personas name NVIDIA's voices (NATF2, ...); a test or demo model ships its own
    (TINY0), so a persona whose named voice the model lacks gets `fallback` (or the model's first
    voice). Voice files are left alone: the engine loads them.
    """
    import dataclasses

    if not voices or persona.voice in voices:
        return persona
    voice = str(persona.voice)
    if os.sep in voice or voice.endswith((".pt", ".wav", ".flac", ".ogg", ".safetensors")):
        return persona
    return dataclasses.replace(persona, voice=fallback or voices[0])


def _file_backend_type():
    from engine.audio.backends import FileBackend

    return FileBackend


def _device(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def main(argv: list[str] | None = None) -> int:
    """`python -m tui.dashboard_cli [parley tui options]`: the dashboard without the CLI dispatch
    (handy while debugging; `parley` calls `run_dashboard` through `tui.commands.run_tui`)."""
    from engine.errors import ParleyError
    from tui.cli import build_parser

    args = build_parser().parse_args(["tui", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_dashboard(args)
    except ParleyError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
