
import pytest

from engine.config import load_model_config, parse_model_config, config_to_json
from engine.errors import ConfigError


def test_empty_config_is_personaplex_7b():
    cfg = parse_model_config({"model_type": "personaplex", "version": "7b-v1"})
    assert cfg.lm.dim == 4096 and cfg.lm.num_layers == 32 and cfg.lm.dep_q == 16
    assert cfg.lm.hidden_scale == 4.125
    assert cfg.lm.hidden_size == 11264 and cfg.lm.depformer_hidden_size == 2816
    assert cfg.mimi.frame_size == 1920 and cfg.mimi.downsample_stride == 2
    assert cfg.lmgen.silence_tokens[0] == 948 and cfg.lmgen.sine_tokens[-1] == 472
    assert cfg.is_personaplex


def test_tiny_fixture_config(tiny_dir):
    cfg = load_model_config(tiny_dir)
    assert (cfg.lm.dim, cfg.lm.card, cfg.lm.text_card) == (64, 64, 256)
    assert cfg.lm.hidden_size == 176 and cfg.lm.depformer_hidden_size == 88
    assert cfg.mimi.quantizer.n_q == 16 and cfg.lmgen.mimi_num_codebooks == 8
    assert cfg.lmgen.silence_tokens == (39, 28, 11, 1, 52, 0, 54, 9)
    # Round trip through the writer used by the tiny-model generator.
    assert parse_model_config(config_to_json(cfg)) == cfg


def test_moshi_layout_is_accepted():
    cfg = parse_model_config({"lm": {"dep_q": 8}})
    assert cfg.lm.dep_q == 8 and not cfg.is_personaplex


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"lm": {"dimm": 5}}, "unknown field(s) dimm"),
        ({"lm": {"dim": "big"}}, "'lm.dim' must be an integer"),
        ({"lm": {"dim": 100}}, "divisible by 'num_heads'"),
        ({"lm": {"dep_q": 12}}, "'dep_q' must be"),
        ({"lm": {"norm": "layer_norm"}}, "rms_norm_f32"),
        ({"lm": {"delays": [0, 1]}}, "'delays' must have"),
        ({"mimi": {"seanet": {"ratioz": [1]}}}, "unknown field(s) ratioz"),
        ({"mimi": {"quantizer": {"bins": 64}}}, "must equal the codec's 'bins'"),
        ({"lmgen": {"silence_tokens": [1, 2]}}, "must have 8 entries"),
        ({"extra": 1}, "unknown top-level field(s) extra"),
        ([], "must contain a JSON object"),
    ],
)
def test_invalid_configs_are_clear_errors(data, fragment):
    with pytest.raises(ConfigError) as err:
        parse_model_config(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_informational_lmgen_keys_are_ignored():
    cfg = parse_model_config({"lmgen": {"real_sine_tokens": [1] * 8}})
    assert cfg.lmgen.sine_tokens[0] == 430


def test_malformed_json_is_clear(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)


def test_config_is_frozen():
    cfg = parse_model_config({})
    with pytest.raises(Exception):
        cfg.lm.dim = 3  # type: ignore[misc]
