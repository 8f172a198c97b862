"""The contract between the session runtime (audio, threads, controls) and the model side.

`FrameModel` is one full-duplex step per 80 ms frame: 1920 mic samples in, 1920 agent samples out.
`engine.duplex.DuplexEngine` implements it with Mimi + the LM; the session runtime only sees this
protocol, so its control logic can be tested on a simulated clock with the real tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

STAGES = ("encode", "temporal", "depth", "decode", "total")


@dataclass(frozen=True)
class FrameResult:
    """What one step produced. `pcm` is the agent's audio for the frame (float32, [frame_size])."""

    pcm: np.ndarray
    tokens: np.ndarray  # [17]: text, agent cb0..7, user cb0..7 of the emitted frame
    text_id: int
    text: str | None  # displayable piece (None for PAD/EPAD), "▁" already turned into a space
    timings_ms: dict[str, float] = field(default_factory=dict)  # keys from STAGES
    notice: str | None = None  # one sentence the session shows as a warning (e.g. a fallback)


class FrameModel(Protocol):
    sample_rate: int
    frame_size: int

    def start(self, persona: Any) -> float:
        """Resets the conversation and prefills `persona` (voice + prompt); returns seconds taken."""

    def step(self, pcm_in: np.ndarray, *, force_agent_silence: bool = False) -> FrameResult:
        """Runs one frame. `force_agent_silence` forces the agent's text to PAD and its audio to the
        SILENCE tokens for this step (interrupt), so the model's context agrees that it stopped."""

    def reset(self) -> None:
        """Clears the conversation state (keeps the persona for the next start)."""
