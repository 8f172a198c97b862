"""Text prompts: wrapping, tokenisation against the reference run, piece display and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelError, ParleyError
from engine.prompts import DEFAULT_PROMPT, TextTokenizer, wrap_system_prompt

FIXTURE = Path(__file__).parent / "fixtures" / "personaplex-tiny"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_model_dir(FIXTURE)


def test_wrap_system_prompt():
    assert wrap_system_prompt("  Hello there. \n") == "<system> Hello there. <system>"
    assert wrap_system_prompt("<system> Already. <system>") == "<system> Already. <system>"
    assert wrap_system_prompt("  <system> Padded. <system>  ") == "<system> Padded. <system>"
    # Only one tag: not wrapped, so wrap (the reference checks both ends).
    assert wrap_system_prompt("<system> half") == "<system> <system> half <system>"
    assert wrap_system_prompt("") == ""
    assert wrap_system_prompt("   \n\t") == ""
    assert wrap_system_prompt(None) == ""  # type: ignore[arg-type]


def test_teacher_prompt_matches_the_reference_text_phase(tok):
    ids = tok.encode_prompt(DEFAULT_PROMPT)
    assert len(ids) == 43
    ref = np.load(FIXTURE / "reference" / "tokens.npz")
    text_phase = list(ref["phase_names"]).index("text")
    rows = ref["step_phase"] == text_phase
    # Step s forces the prompt token at position s: `step_target[:, 0]` of the 43 text-phase steps
    # (step counters 50..92) is the prompt itself, and it is all marked provided. `step_input[:, 0]`
    # is what the transformer *read* at position s-1: shifted by one, so it starts with the PAD (3)
    # of the last silence frame and lacks the prompt's last token (read at step 93, a silence step).
    assert ref["step_offset"][rows].tolist() == list(range(50, 93))
    assert ref["step_provided"][rows, 0].all()
    assert ref["step_target"][rows, 0].tolist() == ids
    assert ref["step_input"][rows, 0].tolist() == [3] + ids[:-1]
    # No BOS/EOS, and the tags are plain text.
    assert 1 not in ids and 2 not in ids
    assert tok.decode(ids) == wrap_system_prompt(DEFAULT_PROMPT)


def test_empty_prompt_has_no_tokens(tok):
    assert tok.encode_prompt("") == []
    assert tok.encode_prompt("   ") == []


def test_already_wrapped_prompt_encodes_the_same(tok):
    assert tok.encode_prompt(f"<system> {DEFAULT_PROMPT} <system>") == tok.encode_prompt(DEFAULT_PROMPT)


def test_pieces_display_and_json(tok):
    assert tok.vocab_size == 256
    assert tok.piece(0) == "<unk>" and tok.piece(3) == "<pad>"
    assert tok.display_piece(0) == "" and tok.display_piece(3) == ""
    assert tok.display_piece(1) == "" and tok.display_piece(2) == ""  # no <s> / </s> on screen
    assert tok.json_piece(2) == "</s>"  # the reference JSON keeps them
    assert tok.json_piece(0) == "EPAD" and tok.json_piece(3) == "PAD"
    assert tok.json_piece(1) == "<s>" and tok.json_piece(2) == "</s>"
    assert tok.piece(5) == "\u2581a" and tok.display_piece(5) == " a" and tok.json_piece(5) == " a"
    with pytest.raises(ValueError):
        tok.piece(256)


def test_json_pieces_reproduce_reference_output_json(tok):
    ref = np.load(FIXTURE / "reference" / "tokens.npz")
    expected = json.loads((FIXTURE / "reference" / "output.json").read_text())
    got = [tok.json_piece(t) for t in ref["out_tokens"][:, 0]]
    assert got == expected


def test_missing_and_corrupt_tokenizer(tmp_path):
    with pytest.raises(ModelError, match="is missing") as err:
        TextTokenizer.from_model_dir(tmp_path)
    assert isinstance(err.value, ParleyError)
    bad = tmp_path / "tokenizer_spm_32k_3.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ModelError, match="corrupt or not a SentencePiece model"):
        TextTokenizer(bad)
    # A directory argument is resolved to the standard file name.
    assert TextTokenizer(FIXTURE).vocab_size == 256
