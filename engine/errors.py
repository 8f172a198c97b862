"""Errors meant for people: each carries one clear sentence saying what is wrong and how to fix it.

The CLI prints `str(error)` and exits non-zero without a traceback for any ParleyError.
"""


class ParleyError(Exception):
    """Base class of every user-facing error. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(ParleyError):
    """config.json is malformed, has unknown fields or unsupported values."""


class ModelError(ParleyError):
    """The model could not be found, fetched or loaded (missing files, wrong layout, gated repo)."""


class CheckpointError(ModelError):
    """A checkpoint file is corrupt or its tensors do not match the configuration."""


class AudioError(ParleyError):
    """Audio input/output failed: unreadable file, no device, refused device."""


class VoiceError(ParleyError):
    """A voice prompt is missing, empty, corrupt or unsafe."""


class NotYetAvailable(ParleyError):
    """A subcommand whose issue is not done yet."""

    exit_code = 2
