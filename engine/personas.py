"""Personas: a name, a role prompt and a voice, plus optional sampling settings.

Built-ins use the prompts NVIDIA ships with PersonaPlex (README prompting guide, the web UI's
presets and `assets/test/prompt_service.txt`) and its voice names (NATF0-3, NATM0-3, VARF0-4,
VARM0-4). User personas are TOML files, one persona per file, in the user's config folder:

    $PARLEY_CONFIG_DIR/personas/*.toml            (when PARLEY_CONFIG_DIR is set; nothing else)
    $XDG_CONFIG_HOME/parley/personas/*.toml       (XDG_CONFIG_HOME defaults to ~/.config)
    ~/Library/Application Support/parley/personas/*.toml   (macOS, in addition)

A persona file:

    name = "Pirate"                    # optional, defaults to the file name without .toml
    description = "A friendly pirate"  # optional
    prompt = "You enjoy having a good conversation. You are a pirate captain named Mary."
    voice = "VARF2"                    # optional (default NATF2): a voice name, or a .pt /
                                       # .safetensors / .wav path (relative to the TOML file)
    text_temperature = 0.7             # optional sampling overrides
    text_top_k = 25
    audio_temperature = 0.8
    audio_top_k = 250

A user persona whose name equals a built-in's (case-insensitively) replaces that built-in.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_VOICE = "NATF2"
DEFAULT_PERSONA = "Teacher"

NATURAL_VOICES = ("NATF0", "NATF1", "NATF2", "NATF3", "NATM0", "NATM1", "NATM2", "NATM3")
VARIETY_VOICES = ("VARF0", "VARF1", "VARF2", "VARF3", "VARF4",
                  "VARM0", "VARM1", "VARM2", "VARM3", "VARM4")
SHIPPED_VOICES = NATURAL_VOICES + VARIETY_VOICES

MAX_PROMPT_CHARS = 4000  # the reference web UI allows 1000; leave room, but catch pasted files
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}$")
_VOICE_SUFFIXES = (".pt", ".safetensors", ".wav", ".flac", ".ogg")


@dataclass(frozen=True)
class Persona:
    """A role prompt and a voice. `voice` is a voice name (looked up in the model's voices) or a
    path to a voice file. Sampling fields left at None use the engine's defaults."""

    name: str
    prompt: str
    voice: str = DEFAULT_VOICE
    description: str = ""
    text_temperature: Optional[float] = None
    text_top_k: Optional[int] = None
    audio_temperature: Optional[float] = None
    audio_top_k: Optional[int] = None
    aliases: tuple[str, ...] = ()
    source: str = "built-in"

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"

    def matches(self, name: str) -> bool:
        key = name.strip().lower()
        return key == self.name.lower() or key in (a.lower() for a in self.aliases)


# --------------------------------------------------------------------------------------------
# Built-ins (prompt texts as NVIDIA ships them)
# --------------------------------------------------------------------------------------------

TEACHER_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and "
    "engaging way."
)
CASUAL_PROMPT = "You enjoy having a good conversation."


def service_prompt(company: str, business: str, name: str, facts: str) -> str:
    """The customer-service pattern the model was trained on (NVIDIA prompting guide)."""
    return (f"You work for {company} which is a {business} and your name is {name}. "
            f"Information: {facts}")


BUILTIN_PERSONAS: tuple[Persona, ...] = (
    Persona(
        name="Teacher",
        aliases=("assistant", "default"),
        prompt=TEACHER_PROMPT,
        voice="NATF2",
        description="NVIDIA's assistant role: a wise and friendly teacher answering questions.",
    ),
    Persona(
        name="Casual",
        aliases=("conversation", "chat"),
        prompt=CASUAL_PROMPT,
        voice="NATM0",
        description="Open-ended small talk (the Fisher-style casual conversation prompt).",
    ),
    Persona(
        name="Home or out",
        prompt=CASUAL_PROMPT + " Have a casual discussion about eating at home versus dining out.",
        voice="NATF1",
        description="Casual conversation about eating at home versus dining out.",
    ),
    Persona(
        name="Family",
        prompt=CASUAL_PROMPT + " Have an empathetic discussion about the meaning of family amid "
        "uncertainty.",
        voice="VARF1",
        description="Empathetic conversation about the meaning of family.",
    ),
    Persona(
        name="Californian",
        prompt=CASUAL_PROMPT + " Have a reflective conversation about career changes and feeling "
        "of home. You have lived in California for 21 years and consider San Francisco your home. "
        "You work as a teacher and have traveled a lot. You dislike meetings.",
        voice="NATF3",
        description="Reflective conversation with a well-travelled teacher from San Francisco.",
    ),
    Persona(
        name="Baker",
        prompt=CASUAL_PROMPT + " Have a casual conversation about favorite foods and cooking "
        "experiences. You are David Green, a former baker now living in Boston. You enjoy cooking "
        "diverse international dishes and appreciate many ethnic restaurants.",
        voice="NATM2",
        description="David Green, a former baker in Boston, chatting about food and cooking.",
    ),
    Persona(
        name="Waste management",
        prompt=service_prompt(
            "CitySan Services", "waste management", "Ayelen Lucero",
            "Verify customer name Omar Torres. Current schedule: every other week. Upcoming "
            "pickup: April 12th. Compost bin service available for $8/month add-on.",
        ),
        voice="VARF0",
        description="Customer service: Ayelen Lucero at CitySan Services (waste collection).",
    ),
    Persona(
        name="Restaurant",
        prompt=service_prompt(
            "Jerusalem Shakshuka", "restaurant", "Owen Foster",
            "There are two shakshuka options: Classic (poached eggs, $9.50) and Spicy (scrambled "
            "eggs with jalapenos, $10.25). Sides include warm pita ($2.50) and Israeli salad ($3). "
            "No combo offers. Available for drive-through until 9 PM.",
        ),
        voice="NATM3",
        description="Customer service: Owen Foster taking orders at Jerusalem Shakshuka.",
    ),
    Persona(
        name="Drone rental",
        prompt=service_prompt(
            "AeroRentals Pro", "drone rental company", "Tomaz Novak",
            "AeroRentals Pro has the following availability: PhoenixDrone X ($65/4 hours, $110/8 "
            "hours), and the premium SpectraDrone 9 ($95/4 hours, $160/8 hours). Deposit required: "
            "$150 for standard models, $300 for premium.",
        ),
        voice="VARM1",
        description="Customer service: Tomaz Novak renting drones at AeroRentals Pro.",
    ),
    Persona(
        name="Appliance repair",
        prompt=service_prompt(
            "SwiftPlex Appliances", "appliance repair company", "Farhod Toshmatov",
            "The dishwasher model is out of stock for replacement parts; we can use an alternative "
            "part with a 3-day delay. Labor cost remains $60 per hour.",
        ),
        voice="NATM1",
        description="Customer service: Farhod Toshmatov at SwiftPlex Appliances (NVIDIA's "
        "service example).",
    ),
    Persona(
        name="Medical office",
        prompt="You work for Dr. Jones's medical office, and you are receiving calls to record "
        "information for new patients. Information: Record full name, date of birth, any "
        "medication allergies, tobacco smoking history, alcohol consumption history, and any prior "
        "medical conditions. Assure the patient that this information will be confidential, if "
        "they ask.",
        voice="NATF0",
        description="Receptionist at Dr. Jones's medical office taking new-patient details.",
    ),
    Persona(
        name="Bank",
        prompt=service_prompt(
            "First Neuron Bank", "bank", "Alexis Kim",
            "The customer's transaction for $1,200 at Home Depot was declined. Verify customer "
            "identity. The transaction was flagged due to unusual location (transaction attempted "
            "in Miami, FL; customer normally transacts in Seattle, WA).",
        ),
        voice="VARF2",
        description="Alexis Kim at First Neuron Bank about a declined card transaction.",
    ),
    Persona(
        name="Astronaut",
        prompt=CASUAL_PROMPT + " Have a technical discussion about fixing a reactor core on a "
        "spaceship to Mars. You are an astronaut on a Mars mission. Your name is Alex. You are "
        "already dealing with a reactor core meltdown on a Mars mission. Several ship systems are "
        "failing, and continued instability will lead to catastrophic failure. You explain what is "
        "happening and you urgently ask for help thinking through how to stabilize the reactor.",
        voice="VARM0",
        description="Alex, an astronaut asking for help with a reactor meltdown on the way to Mars.",
    ),
)


# --------------------------------------------------------------------------------------------
# User personas
# --------------------------------------------------------------------------------------------


def persona_dirs(environ: Optional[Mapping[str, str]] = None,
                 platform: Optional[str] = None) -> list[Path]:
    """Folders searched for user persona files, in priority order (earlier wins on a name clash)."""
    env = os.environ if environ is None else environ
    plat = sys.platform if platform is None else platform
    home = Path(env.get("HOME") or Path.home())
    if env.get("PARLEY_CONFIG_DIR"):
        return [Path(env["PARLEY_CONFIG_DIR"]).expanduser() / "personas"]
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else home / ".config"
    dirs = [base / "parley" / "personas"]
    if plat == "darwin":
        dirs.append(home / "Library" / "Application Support" / "parley" / "personas")
    return dirs


_FIELDS = ("name", "description", "prompt", "voice", "text_temperature", "text_top_k",
           "audio_temperature", "audio_top_k")


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"Persona file {path}: {message}")


def _opt_float(path: Path, data: Mapping[str, Any], key: str) -> Optional[float]:
    if key not in data:
        return None
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, f"`{key}` must be a number such as 0.8, not {v!r}.")
    v = float(v)
    if not (0.0 <= v <= 10.0):
        raise _fail(path, f"`{key}` must be between 0 and 10 (0 means greedy), not {v}.")
    return v


def _opt_int(path: Path, data: Mapping[str, Any], key: str) -> Optional[int]:
    if key not in data:
        return None
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, f"`{key}` must be a whole number such as 25, not {v!r}.")
    if v < 1:
        raise _fail(path, f"`{key}` must be at least 1, not {v}.")
    return v


def _string(path: Path, data: Mapping[str, Any], key: str, default: Optional[str]) -> str:
    if key not in data:
        if default is None:
            raise _fail(path, f"the required field `{key}` is missing; add {key} = \"...\".")
        return default
    v = data[key]
    if not isinstance(v, str):
        raise _fail(path, f"`{key}` must be a text string in quotes, not {v!r}.")
    return v


def load_persona_file(path: Union[str, os.PathLike]) -> Persona:
    """Read and validate one persona TOML file; ConfigError names the file and the field."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Persona file {path} is not valid TOML ({exc}); fix it or remove it.") \
            from None
    except UnicodeDecodeError:
        raise ConfigError(f"Persona file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"Persona file {path} cannot be read ({exc.strerror or exc}); check its "
                          "permissions.") from None

    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise _fail(path, f"unknown field `{unknown[0]}`; the fields are {', '.join(_FIELDS)}.")

    name = _string(path, data, "name", path.stem).strip()
    if not _NAME_RE.match(name):
        raise _fail(path, f"`name` {name!r} must be 1-64 letters, digits, spaces or ._+- and "
                    "start with a letter or digit.")
    prompt = _string(path, data, "prompt", None).strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _fail(path, f"`prompt` is {len(prompt)} characters long; keep it under "
                    f"{MAX_PROMPT_CHARS} (NVIDIA's web UI allows 1000).")
    voice = _string(path, data, "voice", DEFAULT_VOICE).strip()
    if not voice:
        raise _fail(path, "`voice` is empty; give a voice name such as NATF2 or a voice file path.")
    if Path(voice).suffix.lower() in _VOICE_SUFFIXES or "/" in voice or os.sep in voice:
        vpath = Path(voice).expanduser()
        if not vpath.is_absolute():
            vpath = path.parent / vpath
        voice = str(vpath)
    return Persona(
        name=name,
        prompt=prompt,
        voice=voice,
        description=_string(path, data, "description", "").strip(),
        text_temperature=_opt_float(path, data, "text_temperature"),
        text_top_k=_opt_int(path, data, "text_top_k"),
        audio_temperature=_opt_float(path, data, "audio_temperature"),
        audio_top_k=_opt_int(path, data, "audio_top_k"),
        source=str(path),
    )


def scan_user_personas(dirs: Optional[Iterable[Union[str, os.PathLike]]] = None
                       ) -> tuple[list[Persona], list[ConfigError]]:
    """All valid user personas (sorted by name) and the errors of the files that are not valid."""
    folders = persona_dirs() if dirs is None else [Path(d).expanduser() for d in dirs]
    personas: list[Persona] = []
    problems: list[ConfigError] = []
    seen: dict[str, Persona] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            if not path.is_file():
                continue
            try:
                p = load_persona_file(path)
            except ConfigError as exc:
                problems.append(exc)
                continue
            key = p.name.lower()
            if key in seen:
                if Path(seen[key].source).parent == path.parent:
                    problems.append(ConfigError(
                        f"Persona file {path}: the name `{p.name}` is already used by "
                        f"{seen[key].source}; rename one of them."))
                continue  # an earlier folder wins
            seen[key] = p
            personas.append(p)
    personas.sort(key=lambda q: q.name.lower())
    return personas, problems


def list_personas(dirs: Optional[Iterable[Union[str, os.PathLike]]] = None, *,
                  strict: bool = True) -> list[Persona]:
    """Built-ins (user files with the same name replace them in place), then user personas.

    With strict=True the first invalid user file raises its ConfigError; with strict=False
    invalid files are skipped (use `scan_user_personas` to get their errors).
    """
    user, problems = scan_user_personas(dirs)
    if strict and problems:
        raise problems[0]
    by_name = {p.name.lower(): p for p in user}
    out: list[Persona] = []
    for b in BUILTIN_PERSONAS:
        override = by_name.pop(b.name.lower(), None)
        out.append(replace(override, aliases=b.aliases) if override else b)
    out.extend(p for p in user if p.name.lower() in by_name)  # the ones that replaced nothing
    return out


def get_persona(name: str, dirs: Optional[Iterable[Union[str, os.PathLike]]] = None) -> Persona:
    """The persona called `name` (case-insensitive; aliases such as `assistant` work too)."""
    personas = list_personas(dirs, strict=False)
    key = (name or "").strip()
    for p in personas:
        if p.name.lower() == key.lower():
            return p
    for p in personas:
        if p.matches(key):
            return p
    _, problems = scan_user_personas(dirs)
    for exc in problems:  # the wanted persona may be in a broken file: say so
        if key and key.lower() in str(exc).lower():
            raise exc
    names = ", ".join(p.name for p in personas)
    raise ConfigError(f"Unknown persona `{name}`; available personas: {names}.")
