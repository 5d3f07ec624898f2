"""Hugging Face adapter for the dense family: `LlamaForCausalLM` and `MistralForCausalLM`.

Both use the rotate-half RoPE layout that Verse uses, so weights map by name only (no tensor transforms).
"""

import re
from typing import Any, Dict

import torch

from verse.config import ModelArgs
from verse.errors import ConfigError

MODEL_TYPES = ("llama", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# Verse name <- HF name, per layer ("{}" is the layer index) and global.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
}
GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "head.weight": "lm_head.weight"}
# FP8 layers (`verse.model.linear`): Verse `NAME.scale` <-> HF `NAME.weight_scale_inv`, as DeepSeek-V3 stores them
LAYER_NAMES.update({k.removesuffix("weight") + "scale": v + "_scale_inv" for k, v in list(LAYER_NAMES.items())
                    if "norm" not in k})
GLOBAL_NAMES["head.scale"] = "lm_head.weight_scale_inv"
# ModelArgs field -> the config.json key it is read from (errors name the key the user wrote)
HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "inter_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings",
             "original_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
             "sliding_window": "sliding_window", "rope_theta": "rope_theta", "bos_token_id": "bos_token_id",
             "eos_token_id": "eos_token_id"}
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
VERSE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Buffers some older checkpoints saved; they are recomputed, never loaded.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def rope_from_hf(config: Dict[str, Any]) -> Dict[str, Any]:
    """RoPE fields of `ModelArgs` from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: Dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "yarn"):
        raise ConfigError(f"rope scaling {kind!r} is not supported (supported: linear, llama3, yarn)")
    out["rope_scaling"] = kind
    out["rope_factor"] = float(params["factor"])
    if "original_max_position_embeddings" in params:
        out["original_seq_len"] = int(params["original_max_position_embeddings"])
    if kind == "llama3":
        out["low_freq_factor"] = float(params["low_freq_factor"])
        out["high_freq_factor"] = float(params["high_freq_factor"])
    elif kind == "yarn":
        if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
            raise ConfigError("yarn rope scaling with attention_factor or truncate=false is not supported")
        out["beta_fast"] = float(params.get("beta_fast", 32.0))
        out["beta_slow"] = float(params.get("beta_slow", 1.0))
    return out


def args_from_hf(config: Dict[str, Any]) -> ModelArgs:
    """`ModelArgs` of a Hugging Face Llama/Mistral `config.json`.

    Args:
        config (Dict[str, Any]): the parsed config.json; a missing required field raises `KeyError`.

    Returns:
        ModelArgs: the architecture (execution fields at their defaults).
    """
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"{flag}=true is not supported (Verse projections have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (only silu, i.e. SwiGLU)")
    n_heads = config["num_attention_heads"]
    eos = config.get("eos_token_id")
    max_seq_len = config["max_position_embeddings"]
    fields = dict(
        arch=config["model_type"],
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim"),
        inter_dim=config["intermediate_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len,
        original_seq_len=max_seq_len,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=config.get("sliding_window") if config["model_type"] == "mistral" else None,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        tokenizer="hf",
    )
    fields.update(rope_from_hf(config))
    return ModelArgs(**fields)


def hf_config(args: ModelArgs) -> Dict[str, Any]:
    """The Hugging Face `config.json` of a dense Verse model (written in the 4.x spelling that 5.x also reads).

    Args:
        args (ModelArgs): a dense (`attention == "gqa"`, no MoE) configuration.

    Returns:
        Dict[str, Any]: config.json content (without the dtype, which the writer adds).
    """
    if args.attention != "gqa" or args.is_moe:
        raise ConfigError(f"arch {args.arch!r} with MLA/MoE layers has no Llama/Mistral equivalent")
    for name, arch in (("qkv_bias", "qwen2"), ("qk_norm", "qwen3")):
        if getattr(args, name):
            raise ConfigError(f"ModelArgs.{name}: Llama/Mistral have no equivalent; save it as arch {arch!r}",
                              name)
    model_type = args.arch if args.arch in MODEL_TYPES else "llama"
    if args.sliding_window is not None:
        model_type = "mistral"
    config: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.inter_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
    }
    if model_type == "mistral":
        config["sliding_window"] = args.sliding_window
    else:
        config["mlp_bias"] = False
    if args.rope_scaling != "none":
        scaling: Dict[str, Any] = {"rope_type": args.rope_scaling, "factor": args.rope_factor}
        if args.rope_scaling in ("llama3", "yarn"):
            scaling["original_max_position_embeddings"] = args.original_seq_len
        if args.rope_scaling == "llama3":
            scaling.update(low_freq_factor=args.low_freq_factor, high_freq_factor=args.high_freq_factor)
        elif args.rope_scaling == "yarn":
            scaling.update(beta_fast=args.beta_fast, beta_slow=args.beta_slow)
        config["rope_scaling"] = scaling
    return config


def to_verse(state_dict: Dict[str, torch.Tensor], args: ModelArgs,
             layer_names: Dict[str, str] = LAYER_NAMES) -> Dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to Verse names.

    Args:
        state_dict (Dict[str, torch.Tensor]): HF names -> tensors.
        args (ModelArgs): the model configuration (tied embeddings drop a stored `lm_head.weight`).
        layer_names (Dict[str, str]): Verse -> HF names inside a layer (the Qwen adapter adds its own).

    Returns:
        Dict[str, torch.Tensor]: Verse names -> the same tensors.

    Raises:
        KeyError: a tensor name this architecture does not have (the caller reports the file).
    """
    hf_to_verse = {hf: verse for verse, hf in GLOBAL_NAMES.items()}
    hf_layer_names = {hf: verse for verse, hf in layer_names.items()}
    out = {}
    for name, tensor in state_dict.items():
        if IGNORED.fullmatch(name) or (args.tie_embeddings and name == "lm_head.weight"):
            continue
        layer = HF_LAYER.fullmatch(name)
        if layer and layer.group(2) in hf_layer_names:
            out[f"layers.{layer.group(1)}.{hf_layer_names[layer.group(2)]}"] = tensor
        elif name in hf_to_verse:
            out[hf_to_verse[name]] = tensor
        else:
            raise KeyError(name)
    return out


def to_hf(state_dict: Dict[str, torch.Tensor], args: ModelArgs,
          layer_names: Dict[str, str] = LAYER_NAMES) -> Dict[str, torch.Tensor]:
    """Rename Verse tensors to Hugging Face names (tied embeddings store only `model.embed_tokens.weight`).

    Args:
        state_dict (Dict[str, torch.Tensor]): Verse names -> tensors.
        args (ModelArgs): the model configuration.
        layer_names (Dict[str, str]): Verse -> HF names inside a layer.

    Returns:
        Dict[str, torch.Tensor]: HF names -> the same tensors.
    """
    out = {}
    for name, tensor in state_dict.items():
        if args.tie_embeddings and name == "head.weight":
            continue
        layer = VERSE_LAYER.fullmatch(name)
        if layer:
            out[f"model.layers.{layer.group(1)}.{layer_names[layer.group(2)]}"] = tensor
        else:
            out[GLOBAL_NAMES[name]] = tensor
    return out
