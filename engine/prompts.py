"""Text prompts and the SentencePiece text tokenizer (MODEL.md §5, §7.2).

* `wrap_system_prompt`: strip, then wrap as "<system> ... <system>" unless already wrapped (the
  tags are literal text, not special tokens), exactly as the reference's `wrap_with_system_tags`.
* `TextTokenizer.encode_prompt`: wrapped prompt -> SentencePiece ids, no BOS/EOS. An empty or
  all-whitespace prompt gives no tokens (T = 0); the reference crashes on an empty prompt
  (MODEL.md §7.2), and would wrap a whitespace-only one.
* Text display (`display_piece`): ids 0 (EPAD) and 3 (PAD) show nothing; any other id is its
  piece with "▁" (U+2581) turned into a space.
* `json_piece`: what the reference writes per frame into its output JSON: "EPAD" for 0, "PAD" for
  3, otherwise the piece with "▁" as a space (so ids 1 and 2 appear as "<s>" and "</s>").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import ModelError

TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
SYSTEM_TAG = "<system>"

EPAD_ID = 0  # end of padding
BOS_ID = 1
EOS_ID = 2
PAD_ID = 3  # text padding; also the text token of every voice and spacer frame
HIDDEN_IDS = frozenset({EPAD_ID, PAD_ID})
SPACE_MARK = "\u2581"  # "▁"

DEFAULT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and "
    "engaging way."
)


def wrap_system_prompt(text: str) -> str:
    """'<system> ' + stripped + ' <system>' unless already wrapped; '' for an empty prompt."""
    cleaned = (text or "").strip()
    if not cleaned:
        return ""
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


class TextTokenizer:
    """SentencePiece text tokenizer of a PersonaPlex/Moshi model directory."""

    def __init__(self, model_file: Union[str, os.PathLike]):
        import sentencepiece

        path = Path(model_file).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ModelError(
                f"The text tokenizer {path} is missing; the model directory needs "
                f"{TOKENIZER_FILE} (download the model again)."
            )
        try:
            sp = sentencepiece.SentencePieceProcessor()
            sp.Load(str(path))
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelError(
                f"The text tokenizer {path} is corrupt or not a SentencePiece model "
                f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                "download the model again."
            ) from None
        if sp.vocab_size() <= PAD_ID:
            raise ModelError(
                f"The text tokenizer {path} has only {sp.vocab_size()} pieces, too few for "
                "PersonaPlex (ids 0-3 are special); download the model again."
            )
        self._sp = sp
        self.path = path
        self._pieces: list[str] | None = None

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, os.PathLike]) -> "TextTokenizer":
        return cls(Path(model_dir).expanduser() / TOKENIZER_FILE)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece encoding, no BOS/EOS."""
        return [int(i) for i in self._sp.encode(text)]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a role prompt: wrapped in <system> tags; [] for an empty prompt."""
        wrapped = wrap_system_prompt(text)
        return self.encode(wrapped) if wrapped else []

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _all_pieces(self) -> list[str]:
        if self._pieces is None:
            self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return self._pieces

    def piece(self, token_id: int) -> str:
        """The raw SentencePiece piece of an id (with "▁" for spaces)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"text token {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._all_pieces()[token_id]

    def display_piece(self, token_id: int) -> str:
        """Text to show for a sampled token: '' for EPAD/PAD and the BOS/EOS markers, else the
        piece with spaces."""
        if int(token_id) in HIDDEN_IDS or int(token_id) in (BOS_ID, EOS_ID):
            return ""
        return self.piece(token_id).replace(SPACE_MARK, " ")

    def json_piece(self, token_id: int) -> str:
        """The reference's output.json entry for a token: 'EPAD', 'PAD', or the spaced piece."""
        token_id = int(token_id)
        if token_id == EPAD_ID:
            return "EPAD"
        if token_id == PAD_ID:
            return "PAD"
        return self.piece(token_id).replace(SPACE_MARK, " ")
