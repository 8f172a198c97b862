"""Personas: built-ins, user TOML files, validation errors, lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.personas import (
    BUILTIN_PERSONAS,
    DEFAULT_PERSONA,
    SHIPPED_VOICES,
    TEACHER_PROMPT,
    Persona,
    get_persona,
    list_personas,
    load_persona_file,
    persona_dirs,
    scan_user_personas,
)
from engine.prompts import DEFAULT_PROMPT


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def test_builtins_use_shipped_prompts_and_voices():
    names = [p.name.lower() for p in BUILTIN_PERSONAS]
    assert len(names) == len(set(names))
    for p in BUILTIN_PERSONAS:
        assert p.voice in SHIPPED_VOICES and p.prompt and p.description and p.builtin
    teacher = get_persona(DEFAULT_PERSONA, dirs=[])
    assert teacher.prompt == TEACHER_PROMPT == DEFAULT_PROMPT
    assert get_persona("assistant", dirs=[]) is teacher
    assert get_persona("  TEACHER ", dirs=[]) is teacher
    assert get_persona("casual", dirs=[]).prompt == "You enjoy having a good conversation."
    service = [p for p in BUILTIN_PERSONAS if p.prompt.startswith("You work for ")]
    assert len(service) >= 4
    for p in service:
        assert " which is a " in p.prompt or "medical office" in p.prompt
        assert "Information: " in p.prompt
    for wanted in ("medical office", "bank", "astronaut"):
        assert get_persona(wanted, dirs=[]).name.lower() == wanted


def test_builtin_prompts_tokenise_with_the_tiny_tokenizer():
    from engine.prompts import TextTokenizer

    tok = TextTokenizer.from_model_dir(Path(__file__).parent / "fixtures" / "personaplex-tiny")
    for p in BUILTIN_PERSONAS:
        ids = tok.encode_prompt(p.prompt)
        assert 0 < len(ids) < 1000


def test_unknown_persona_lists_names():
    with pytest.raises(ConfigError, match=r"Unknown persona `nobody`; available personas: Teacher, "):
        get_persona("nobody", dirs=[])


def test_user_persona_file(tmp_path):
    d = tmp_path / "personas"
    _write(d, "pirate.toml", '''
description = "A friendly pirate"
prompt = """  You enjoy having a good conversation. You are Mary, a pirate captain.  """
voice = "VARF3"
text_temperature = 0.6
text_top_k = 20
audio_temperature = 1
audio_top_k = 100
''')
    p = get_persona("PIRATE", dirs=[d])
    assert p == Persona(
        name="pirate", prompt="You enjoy having a good conversation. You are Mary, a pirate captain.",
        voice="VARF3", description="A friendly pirate", text_temperature=0.6, text_top_k=20,
        audio_temperature=1.0, audio_top_k=100, source=str(d / "pirate.toml"))
    assert not p.builtin
    names = [q.name for q in list_personas(dirs=[d])]
    assert names[: len(BUILTIN_PERSONAS)] == [b.name for b in BUILTIN_PERSONAS]
    assert names[-1] == "pirate"


def test_user_persona_defaults_and_voice_paths(tmp_path):
    d = tmp_path / "personas"
    p = load_persona_file(_write(d, "x.toml", 'name = "Minimal"\nprompt = "Be brief."\n'))
    assert p.name == "Minimal" and p.voice == "NATF2" and p.text_temperature is None
    p = load_persona_file(_write(d, "y.toml", 'prompt = "Hi."\nvoice = "voices/me.wav"\n'))
    assert p.voice == str(d / "voices" / "me.wav")
    p = load_persona_file(_write(d, "z.toml", 'prompt = "Hi."\nvoice = "/abs/me.safetensors"\n'))
    assert p.voice == "/abs/me.safetensors"
    # An empty prompt is allowed: the engine runs no text-prompt frames.
    assert load_persona_file(_write(d, "e.toml", 'prompt = ""\n')).prompt == ""


def test_user_persona_replaces_builtin(tmp_path):
    d = tmp_path / "p"
    _write(d, "teacher.toml", 'name = "Teacher"\nprompt = "You are a strict teacher."\nvoice = "NATM3"\n')
    personas = list_personas(dirs=[d])
    assert len(personas) == len(BUILTIN_PERSONAS)
    t = get_persona("assistant", dirs=[d])  # the alias follows the replacement
    assert t.prompt == "You are a strict teacher." and t.voice == "NATM3" and not t.builtin


@pytest.mark.parametrize(
    "text, message",
    [
        ('prompt = "x"\ncolour = "red"\n', r"unknown field `colour`"),
        ('description = "no prompt"\n', r"required field `prompt` is missing"),
        ('prompt = 42\n', r"`prompt` must be a text string"),
        ('prompt = "x"\nvoice = ""\n', r"`voice` is empty"),
        ('prompt = "x"\ntext_temperature = "hot"\n', r"`text_temperature` must be a number"),
        ('prompt = "x"\naudio_temperature = 99\n', r"`audio_temperature` must be between 0 and 10"),
        ('prompt = "x"\ntext_top_k = 2.5\n', r"`text_top_k` must be a whole number"),
        ('prompt = "x"\naudio_top_k = 0\n', r"`audio_top_k` must be at least 1"),
        ('prompt = "x"\ntext_top_k = true\n', r"`text_top_k` must be a whole number"),
        ('prompt = "x"\nname = "../etc"\n', r"`name` '../etc' must be"),
        ('prompt = "x" "y"\n', r"is not valid TOML"),
    ],
)
def test_invalid_files_name_file_and_field(tmp_path, text, message):
    p = _write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError, match=message) as err:
        load_persona_file(p)
    assert str(p) in str(err.value)
    assert "\n" not in str(err.value).strip()


def test_broken_file_handling_in_listing(tmp_path):
    d = tmp_path / "p"
    _write(d, "good.toml", 'prompt = "Fine."\n')
    bad = _write(d, "broken.toml", 'prompt = 1\n')
    with pytest.raises(ConfigError, match="broken.toml"):
        list_personas(dirs=[d])
    names = [p.name for p in list_personas(dirs=[d], strict=False)]
    assert "good" in names and "broken" not in names
    personas, problems = scan_user_personas([d])
    assert [p.name for p in personas] == ["good"] and str(bad) in str(problems[0])
    # Asking for the broken persona explains what is wrong with its file.
    with pytest.raises(ConfigError, match=r"broken.toml: `prompt` must be a text string"):
        get_persona("broken", dirs=[d])
    assert get_persona("good", dirs=[d]).prompt == "Fine."


def test_duplicate_names_in_one_folder(tmp_path):
    d = tmp_path / "p"
    _write(d, "a.toml", 'name = "Same"\nprompt = "A."\n')
    _write(d, "b.toml", 'name = "same"\nprompt = "B."\n')
    with pytest.raises(ConfigError, match="already used by"):
        list_personas(dirs=[d])
    assert get_persona("same", dirs=[d]).prompt == "A."


def test_persona_dirs_environment(tmp_path):
    env = {"HOME": str(tmp_path), "PARLEY_CONFIG_DIR": str(tmp_path / "cfg")}
    assert persona_dirs(env, "linux") == [tmp_path / "cfg" / "personas"]
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert persona_dirs(env, "linux") == [tmp_path / "xdg" / "parley" / "personas"]
    env = {"HOME": str(tmp_path)}
    assert persona_dirs(env, "linux") == [tmp_path / ".config" / "parley" / "personas"]
    assert persona_dirs(env, "darwin") == [
        tmp_path / ".config" / "parley" / "personas",
        tmp_path / "Library" / "Application Support" / "parley" / "personas",
    ]


def test_default_dirs_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_CONFIG_DIR", str(tmp_path))
    _write(tmp_path / "personas", "robot.toml", 'prompt = "You are a robot."\nvoice = "VARM4"\n')
    assert get_persona("robot").voice == "VARM4"
    assert "robot" in [p.name for p in list_personas()]
