"""ModelArgs: presets match the published parameter counts; invalid configs fail with one line naming the field."""

import pytest

from verse import ModelArgs, ReasoningLLM
from verse.config import count_params, list_presets
from verse.errors import ConfigError

# Published parameter counts (model cards / safetensors metadata of the original checkpoints).
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "llama-3-8b": 8_030_261_248,
    "llama-2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    assert count_params(ModelArgs.from_preset(name)) == pytest.approx(PUBLISHED[name], rel=1e-3)


def test_count_params_equals_instantiated_model():
    args = ModelArgs.from_preset("tiny", tie_embeddings=True)
    assert count_params(args) == ReasoningLLM(args).num_params()


def test_all_dense_presets_load():
    names = set(list_presets())
    assert {"tiny", "smollm2-135m", "llama-2-7b", "mistral-7b", "llama-3-8b", "llama-2-70b"} <= names


@pytest.mark.parametrize("changes, field", [
    (dict(dim=100, n_heads=3, n_kv_heads=1), "dim"),
    (dict(dim=66, n_heads=6, n_kv_heads=1), "head_dim"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(dtype="float8"), "dtype"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(n_routed_experts=4, n_activated_experts=5), "n_activated_experts"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_preset("tiny", **changes)
    message = str(err.value)
    assert f"ModelArgs.{field}" in message and "\n" not in message


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelArgs.from_preset("nope")
    with pytest.raises(ConfigError, match="unknown ModelArgs field"):
        ModelArgs.from_dict({"dimm": 3})
