"""Model configuration: frozen, validated dataclasses resolved from a model directory's config.json.

A config.json without architecture fields (NVIDIA's ships only model_type/version) means the
built-in PersonaPlex-7B configuration. "lm", "mimi" and "lmgen" objects override it key by key,
using the key names of Kyutai's `moshi` package (`_lm_kwargs`, `_mimi_config`). MODEL.md §2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError


def _tuple_of_ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"config field '{name}' must be a list of integers, got {value!r}.")
    return tuple(value)


def _check_type(name: str, value: Any, kind: Any) -> Any:
    """Checks one scalar field; ints are accepted where floats are expected."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config field '{name}' must be an integer, got {value!r}.")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config field '{name}' must be true or false, got {value!r}.")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"config field '{name}' must be a string, got {value!r}.")
    if kind is float and not isinstance(value, float):
        raise ConfigError(f"config field '{name}' must be a number, got {value!r}.")
    return value


def _build(cls, section: str, values: Mapping[str, Any], base=None):
    """Builds dataclass `cls` from `values` merged over `base`, rejecting unknown keys."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{section}' must be a JSON object.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known) - set(getattr(cls, "IGNORED_KEYS", ())))
    if unknown:
        raise ConfigError(
            f"config section '{section}' has unknown field(s) {', '.join(unknown)}; "
            f"check the spelling against the moshi key names."
        )
    merged = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        if key in known:
            merged[key] = value
    missing = [name for name in known if name not in merged]
    if missing:
        raise ConfigError(f"config section '{section}' is missing field(s) {', '.join(missing)}.")
    return cls.from_dict(merged, section)


class _Section:
    """Mixin: typed construction from a plain dict, using each field's `kind` metadata."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], section: str):
        kwargs = {}
        for f in fields(cls):
            kind = f.metadata.get("kind")
            name = f"{section}.{f.name}"
            value = values[f.name]
            if kind == "ints":
                value = _tuple_of_ints(value, name)
            elif kind == "optional_float":
                if value is not None:
                    value = _check_type(name, value, float)
            elif kind is not None:
                value = _check_type(name, value, kind)
            kwargs[f.name] = value
        obj = cls(**kwargs)
        obj.validate(section)
        return obj


def _f(kind):
    return field(metadata={"kind": kind})


def _require(cond: bool, section: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config section '{section}': {message}")


@dataclass(frozen=True)
class LMConfig(_Section):
    """The language model (moshi `_lm_kwargs` names). MODEL.md §2.3."""

    dim: int = _f(int)
    text_card: int = _f(int)
    existing_text_padding_id: int = _f(int)
    n_q: int = _f(int)
    dep_q: int = _f(int)
    card: int = _f(int)
    num_heads: int = _f(int)
    num_layers: int = _f(int)
    hidden_scale: float = _f(float)
    causal: bool = _f(bool)
    layer_scale: float | None = _f("optional_float")
    context: int = _f(int)
    max_period: float = _f(float)
    gating: str = _f(str)
    norm: str = _f(str)
    positional_embedding: str = _f(str)
    depformer_dim: int = _f(int)
    depformer_dim_feedforward: int = _f(int)
    depformer_num_heads: int = _f(int)
    depformer_num_layers: int = _f(int)
    depformer_layer_scale: float | None = _f("optional_float")
    depformer_multi_linear: bool = _f(bool)
    depformer_context: int = _f(int)
    depformer_max_period: float = _f(float)
    depformer_gating: str = _f(str)
    depformer_pos_emb: str = _f(str)
    depformer_weights_per_step: bool = _f(bool)
    delays: tuple[int, ...] = _f("ints")

    def validate(self, section: str = "lm") -> None:
        for name in ("dim", "text_card", "n_q", "dep_q", "card", "num_heads", "num_layers",
                     "context", "depformer_dim", "depformer_dim_feedforward",
                     "depformer_num_heads", "depformer_num_layers"):
            _require(getattr(self, name) > 0, section, f"'{name}' must be positive.")
        _require(self.dim % self.num_heads == 0, section, "'dim' must be divisible by 'num_heads'.")
        _require(self.depformer_dim % self.depformer_num_heads == 0, section,
                 "'depformer_dim' must be divisible by 'depformer_num_heads'.")
        _require(self.hidden_scale > 0, section, "'hidden_scale' must be positive.")
        _require(self.causal, section, "only causal models are supported ('causal': true).")
        _require(self.layer_scale is None, section, "only 'layer_scale': null is supported.")
        _require(self.depformer_layer_scale is None, section,
                 "only 'depformer_layer_scale': null is supported.")
        _require(self.gating == "silu" and self.depformer_gating == "silu", section,
                 "only 'silu' gating is supported.")
        _require(self.norm == "rms_norm_f32", section, "only 'norm': 'rms_norm_f32' is supported.")
        _require(self.positional_embedding == "rope", section,
                 "only 'positional_embedding': 'rope' is supported.")
        _require(self.depformer_pos_emb == "none", section,
                 "only 'depformer_pos_emb': 'none' is supported.")
        _require(self.depformer_multi_linear and self.depformer_weights_per_step, section,
                 "only per-step depformer weights are supported.")
        _require(self.n_q % 2 == 0, section, "'n_q' must be even (agent + user codebooks).")
        _require(self.dep_q in (self.n_q // 2, self.n_q), section,
                 f"'dep_q' must be {self.n_q // 2} (Moshi) or {self.n_q} (PersonaPlex).")
        _require(len(self.delays) == self.n_q + 1, section,
                 f"'delays' must have n_q + 1 = {self.n_q + 1} entries.")
        _require(all(d in (0, 1) for d in self.delays), section, "delays must be 0 or 1.")
        _require(0 <= self.existing_text_padding_id < self.text_card, section,
                 "'existing_text_padding_id' must be a valid text id.")

    # Derived sizes (MODEL.md §3.5).
    @staticmethod
    def _gated_hidden(dim: int, ff: int) -> int:
        return 2 * ff // 3 if ff != 4 * dim else 21 * dim // 8

    @property
    def hidden_size(self) -> int:
        return self._gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_size(self) -> int:
        return self._gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def audio_codebooks(self) -> int:
        """Codebooks per speaker (8)."""
        return self.n_q // 2

    @property
    def num_channels(self) -> int:
        return self.n_q + 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)


@dataclass(frozen=True)
class SeanetConfig(_Section):
    channels: int = _f(int)
    dimension: int = _f(int)
    causal: bool = _f(bool)
    n_filters: int = _f(int)
    n_residual_layers: int = _f(int)
    activation: str = _f(str)
    compress: int = _f(int)
    dilation_base: int = _f(int)
    disable_norm_outer_blocks: int = _f(int)
    kernel_size: int = _f(int)
    residual_kernel_size: int = _f(int)
    last_kernel_size: int = _f(int)
    norm: str = _f(str)
    pad_mode: str = _f(str)
    ratios: tuple[int, ...] = _f("ints")
    true_skip: bool = _f(bool)

    def validate(self, section: str = "mimi.seanet") -> None:
        _require(self.channels == 1, section, "only mono ('channels': 1) is supported.")
        _require(self.causal, section, "only causal SEANet is supported.")
        _require(self.activation == "ELU", section, "only 'activation': 'ELU' is supported.")
        _require(self.norm == "none", section, "only 'norm': 'none' (folded weights) is supported.")
        _require(self.pad_mode == "constant", section, "only 'pad_mode': 'constant' is supported.")
        _require(self.true_skip, section, "only 'true_skip': true is supported.")
        _require(len(self.ratios) > 0 and all(r > 0 for r in self.ratios), section,
                 "'ratios' must be positive.")
        for name in ("dimension", "n_filters", "n_residual_layers", "compress", "dilation_base",
                     "kernel_size", "residual_kernel_size", "last_kernel_size"):
            _require(getattr(self, name) > 0, section, f"'{name}' must be positive.")

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class QuantizerConfig(_Section):
    dimension: int = _f(int)
    n_q: int = _f(int)
    bins: int = _f(int)
    input_dimension: int = _f(int)
    output_dimension: int = _f(int)

    def validate(self, section: str = "mimi.quantizer") -> None:
        for name in ("dimension", "n_q", "bins", "input_dimension", "output_dimension"):
            _require(getattr(self, name) > 0, section, f"'{name}' must be positive.")
        _require(self.n_q >= 2, section, "'n_q' must be at least 2 (semantic + acoustic).")


@dataclass(frozen=True)
class MimiTransformerConfig(_Section):
    d_model: int = _f(int)
    num_heads: int = _f(int)
    num_layers: int = _f(int)
    causal: bool = _f(bool)
    layer_scale: float | None = _f("optional_float")
    context: int = _f(int)
    conv_layout: bool = _f(bool)
    max_period: float = _f(float)
    gating: str = _f(str)
    norm: str = _f(str)
    positional_embedding: str = _f(str)
    dim_feedforward: int = _f(int)
    input_dimension: int = _f(int)
    output_dimensions: tuple[int, ...] = _f("ints")

    def validate(self, section: str = "mimi.transformer") -> None:
        for name in ("d_model", "num_heads", "num_layers", "context", "dim_feedforward"):
            _require(getattr(self, name) > 0, section, f"'{name}' must be positive.")
        _require(self.d_model % self.num_heads == 0, section,
                 "'d_model' must be divisible by 'num_heads'.")
        _require(self.causal, section, "only causal transformers are supported.")
        _require(self.gating == "none", section, "only 'gating': 'none' is supported.")
        _require(self.norm == "layer_norm", section, "only 'norm': 'layer_norm' is supported.")
        _require(self.positional_embedding == "rope", section,
                 "only 'positional_embedding': 'rope' is supported.")
        _require(self.input_dimension == self.d_model
                 and tuple(self.output_dimensions) == (self.d_model,), section,
                 "input/output projections are not supported (dimensions must equal d_model).")


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int
    channels: int
    frame_rate: float
    seanet: SeanetConfig
    quantizer: QuantizerConfig
    transformer: MimiTransformerConfig

    @property
    def frame_size(self) -> int:
        """Samples per codec frame (1920 at 24 kHz / 12.5 Hz)."""
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        return int(round(self.encoder_frame_rate / self.frame_rate))


@dataclass(frozen=True)
class LMGenConfig(_Section):
    """PersonaPlex prompt-phase constants. MODEL.md §7.4."""

    IGNORED_KEYS = ("real_silence_tokens", "real_sine_tokens")

    silence_tokens: tuple[int, ...] = _f("ints")
    sine_tokens: tuple[int, ...] = _f("ints")
    audio_tokens_per_stream: int = _f(int)
    zero_text_code: int = _f(int)
    audio_silence_frame_cnt: int = _f(int)
    mimi_num_codebooks: int = _f(int)

    def validate(self, section: str = "lmgen") -> None:
        n = self.audio_tokens_per_stream
        _require(n > 0, section, "'audio_tokens_per_stream' must be positive.")
        _require(len(self.silence_tokens) == n and len(self.sine_tokens) == n, section,
                 f"'silence_tokens' and 'sine_tokens' must have {n} entries.")
        _require(self.mimi_num_codebooks == n, section,
                 "'mimi_num_codebooks' must equal 'audio_tokens_per_stream'.")
        _require(self.audio_silence_frame_cnt >= 0, section,
                 "'audio_silence_frame_cnt' must not be negative.")


@dataclass(frozen=True)
class ModelConfig:
    lm: LMConfig
    mimi: MimiConfig
    lmgen: LMGenConfig
    model_type: str = "personaplex"
    version: str | None = None

    @property
    def is_personaplex(self) -> bool:
        return self.lm.dep_q == self.lm.n_q

    def cross_validate(self) -> None:
        q = self.mimi.quantizer
        _require(self.lm.card == q.bins, "lm",
                 f"'card' ({self.lm.card}) must equal the codec's 'bins' ({q.bins}).")
        _require(self.lm.audio_codebooks == self.lmgen.audio_tokens_per_stream, "lmgen",
                 "'audio_tokens_per_stream' must be half of lm 'n_q'.")
        _require(self.lmgen.mimi_num_codebooks <= q.n_q, "lmgen",
                 f"the codec stores only {q.n_q} quantizer levels.")
        for name in ("silence_tokens", "sine_tokens"):
            toks = getattr(self.lmgen, name)
            _require(all(0 <= t < self.lm.card for t in toks), "lmgen",
                     f"'{name}' must be codes below {self.lm.card}; tiny models need their own "
                     "constants in config.json → lmgen.")


# Built-in PersonaPlex-7B defaults (MODEL.md §2.3).
DEFAULT_LM = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3,
    "n_q": 16, "dep_q": 16, "card": 2048,
    "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125,
    "causal": True, "layer_scale": None, "context": 3000, "max_period": 10000,
    "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 1024, "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16, "depformer_num_layers": 6, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

DEFAULT_SEANET = {
    "channels": 1, "dimension": 512, "causal": True, "n_filters": 64, "n_residual_layers": 1,
    "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
    "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
    "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
}
DEFAULT_QUANTIZER = {
    "dimension": 256, "n_q": 32, "bins": 2048, "input_dimension": 512, "output_dimension": 512,
}
DEFAULT_MIMI_TRANSFORMER = {
    "d_model": 512, "num_heads": 8, "num_layers": 8, "causal": True, "layer_scale": 0.01,
    "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 2048,
    "input_dimension": 512, "output_dimensions": [512],
}
DEFAULT_MIMI_TOP = {"sample_rate": 24000, "channels": 1, "frame_rate": 12.5}

DEFAULT_LMGEN = {
    "silence_tokens": [948, 243, 1178, 546, 1736, 1030, 1978, 2008],
    "sine_tokens": [430, 1268, 381, 1611, 1095, 1495, 56, 472],
    "audio_tokens_per_stream": 8, "zero_text_code": 3,
    "audio_silence_frame_cnt": 6, "mimi_num_codebooks": 8,
}


def default_mimi_config() -> MimiConfig:
    return parse_mimi_config({})


def parse_mimi_config(values: Mapping[str, Any]) -> MimiConfig:
    if not isinstance(values, Mapping):
        raise ConfigError("config section 'mimi' must be a JSON object.")
    allowed = set(DEFAULT_MIMI_TOP) | {"seanet", "quantizer", "transformer"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"config section 'mimi' has unknown field(s) {', '.join(unknown)}.")
    top = {**DEFAULT_MIMI_TOP, **{k: v for k, v in values.items() if k in DEFAULT_MIMI_TOP}}
    sample_rate = _check_type("mimi.sample_rate", top["sample_rate"], int)
    channels = _check_type("mimi.channels", top["channels"], int)
    frame_rate = _check_type("mimi.frame_rate", top["frame_rate"], float)
    _require(sample_rate > 0 and frame_rate > 0, "mimi", "rates must be positive.")
    _require(channels == 1, "mimi", "only mono ('channels': 1) is supported.")
    seanet = _build(SeanetConfig, "mimi.seanet", {**DEFAULT_SEANET, **values.get("seanet", {})})
    quantizer = _build(QuantizerConfig, "mimi.quantizer",
                       {**DEFAULT_QUANTIZER, **values.get("quantizer", {})})
    transformer = _build(MimiTransformerConfig, "mimi.transformer",
                         {**DEFAULT_MIMI_TRANSFORMER, **values.get("transformer", {})})
    _require(seanet.dimension == quantizer.input_dimension == quantizer.output_dimension
             == transformer.d_model, "mimi",
             "seanet 'dimension', quantizer input/output dimensions and transformer 'd_model' "
             "must be equal.")
    cfg = MimiConfig(sample_rate, channels, frame_rate, seanet, quantizer, transformer)
    hop = seanet.hop_length
    _require(sample_rate % hop == 0, "mimi", "the sample rate must be a multiple of the SEANet hop.")
    _require(abs(cfg.frame_size * frame_rate - sample_rate) < 1e-6
             and cfg.frame_size % hop == 0, "mimi",
             "'frame_rate' must divide the SEANet rate into whole frames.")
    return cfg


def parse_model_config(data: Mapping[str, Any]) -> ModelConfig:
    """Resolves a config.json object into a validated ModelConfig (MODEL.md §2.2)."""
    if not isinstance(data, Mapping):
        raise ConfigError("config.json must contain a JSON object.")
    allowed = {"model_type", "version", "lm", "mimi", "lmgen"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"config.json has unknown top-level field(s) {', '.join(unknown)}; "
            "expected only model_type, version, lm, mimi and lmgen."
        )
    lm = _build(LMConfig, "lm", {**DEFAULT_LM, **data.get("lm", {})})
    mimi = parse_mimi_config(data.get("mimi", {}))
    lmgen = _build(LMGenConfig, "lmgen", {**DEFAULT_LMGEN, **data.get("lmgen", {})})
    model_type = data.get("model_type", "personaplex")
    version = data.get("version")
    if not isinstance(model_type, str):
        raise ConfigError("config.json 'model_type' must be a string.")
    cfg = ModelConfig(lm=lm, mimi=mimi, lmgen=lmgen, model_type=model_type,
                      version=None if version is None else str(version))
    cfg.cross_validate()
    return cfg


def load_model_config(path: str | Path) -> ModelConfig:
    """Reads and resolves `config.json` (a file, or a model directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; a model directory needs a config.json.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    return parse_model_config(data)


def config_to_json(cfg: ModelConfig) -> dict:
    """The full config.json object for `cfg` (used by the tiny-model generator)."""
    mimi = dataclasses.asdict(cfg.mimi)
    return {
        "model_type": cfg.model_type,
        "lm": {k: (list(v) if isinstance(v, tuple) else v)
               for k, v in dataclasses.asdict(cfg.lm).items()},
        "mimi": _lists(mimi),
        "lmgen": _lists(dataclasses.asdict(cfg.lmgen)),
    }


def _lists(obj):
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj
