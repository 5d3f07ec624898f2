"""Hugging Face adapter for the DeepSeek family: `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM` (MLA + MoE).

Two tensor transforms besides renaming:

- RoPE layout: DeepSeek checkpoints rotate interleaved channel pairs (x0, x1), (x2, x3), ... (V2 always, V3 with
  `rope_interleave: true`, the Hub default); Verse rotates halves. The rotary rows of the query projection and of
  `kv_a_proj_with_mqa` are permuted evens-then-odds on the way in and back on the way out, which leaves every
  attention score unchanged (the same permutation acts on queries and keys).
- Experts: HF files keep one `mlp.experts.E.{gate,up,down}_proj.weight` per expert; Verse stacks them into
  `ffn.experts.{w1,w3,w2}` [n_experts, ...] for grouped GEMMs (FP8 experts are dequantized to `args.dtype` first).

FP8 weights keep their block scales: HF `NAME.weight_scale_inv` <-> Verse `NAME.scale` (see `verse.model.linear`).
"""

import re
import warnings
from typing import Any, Dict, Optional

import torch

from verse.config import ModelArgs
from verse.errors import CheckpointError, ConfigError
from verse.fp8 import BLOCK_SIZE, weight_dequant

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Verse module <- HF module, inside a layer
LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wq_a": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj",
    "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w2": "mlp.down_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "ffn.gate": "mlp.gate",
}
GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "head.weight": "lm_head.weight", "head.scale": "lm_head.weight_scale_inv"}  # scale: an FP8 head's
# Verse parameter suffix <- HF tensor suffix
SUFFIXES = {"weight": "weight", "scale": "weight_scale_inv", "bias": "e_score_correction_bias"}
EXPERT_WEIGHTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.([a-z_]+)")
HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\."
                       r"(weight|weight_scale_inv)")
VERSE_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.([a-z_0-9]+)")
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# ModelArgs field -> the config.json key it is read from (errors name the key the user wrote)
HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "inter_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
             "max_seq_len": "max_position_embeddings", "original_seq_len": "max_position_embeddings",
             "tie_embeddings": "tie_word_embeddings", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
             "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
             "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
             "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
             "moe_inter_dim": "moe_intermediate_size", "n_dense_layers": "first_k_dense_replace",
             "score_func": "scoring_func", "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
             "route_scale": "routed_scaling_factor", "norm_topk_prob": "norm_topk_prob",
             "aux_loss_alpha": "aux_loss_alpha", "rope_theta": "rope_theta", "bos_token_id": "bos_token_id",
             "eos_token_id": "eos_token_id"}

def _rope_from_hf(config: Dict[str, Any]) -> Dict[str, Any]:
    """RoPE/YaRN fields from transformers 5 `rope_parameters` or DeepSeek's `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    out: Dict[str, Any] = {"rope_theta": float(params.get("rope_theta", config.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return out
    if kind != "yarn":
        raise ConfigError(f"rope scaling {kind!r} is not supported for DeepSeek models (supported: yarn)")
    if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
        raise ConfigError("yarn rope scaling with attention_factor or truncate=false is not supported")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or config["max_position_embeddings"] / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # transformers then scales cos/sin by mscale(factor, 1) and leaves the softmax scale alone
        mscale, mscale_all_dim = 1.0, 0.0
    out.update(rope_scaling="yarn", rope_factor=float(factor), original_seq_len=original,
               beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
               mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    return out


def args_from_hf(config: Dict[str, Any]) -> ModelArgs:
    """`ModelArgs` of a Hugging Face DeepSeek-V2/V3 `config.json` (transformers or DeepSeek's own spelling).

    Args:
        config (Dict[str, Any]): the parsed config.json; a missing required field raises `KeyError`.

    Returns:
        ModelArgs: the architecture (execution fields at their defaults).
    """
    model_type = config["model_type"]
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a DeepSeek-V2/V3 model")
    if config.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported (Verse projections have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (only silu, i.e. SwiGLU)")
    if model_type == "deepseek_v3" and config.get("rope_interleave", True) is False:
        raise ConfigError("rope_interleave=false is not supported (Verse reads the interleaved DeepSeek layout)")
    if (config.get("moe_layer_freq") or 1) != 1:
        # DeepSeek's code puts MoE where i % freq == 0, Verse where (i - n_dense_layers) % freq == 0
        raise ConfigError("moe_layer_freq != 1 is not supported in config.json (give the layout in verse.json)")
    v3 = model_type == "deepseek_v3"
    topk_method = config.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    grouped = topk_method != "greedy"
    eos = config.get("eos_token_id")
    n_routed = config.get("n_routed_experts") or 0
    fields = dict(
        arch=model_type,
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        inter_dim=config["intermediate_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_seq_len=config["max_position_embeddings"],
        original_seq_len=config["max_position_embeddings"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention="mla",
        q_lora_rank=config.get("q_lora_rank") or 0,
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        n_routed_experts=n_routed,
        n_shared_experts=config.get("n_shared_experts") or 0,
        n_activated_experts=config.get("num_experts_per_tok") or 0,
        moe_inter_dim=config.get("moe_intermediate_size") or 1,
        n_dense_layers=config.get("first_k_dense_replace") or 0,
        score_func=config.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        n_expert_groups=(config.get("n_group") or 1) if grouped else 1,
        n_limited_groups=(config.get("topk_group") or 1) if grouped else 1,
        route_scale=float(config.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=bool(config.get("norm_topk_prob", v3)),
        aux_loss_alpha=float(config.get("aux_loss_alpha") or 0.0),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        tokenizer="hf",
    )
    fields.update(_rope_from_hf(config))
    return ModelArgs(**fields)


def hf_config(args: ModelArgs) -> Dict[str, Any]:
    """The Hugging Face `config.json` of a DeepSeek-family Verse model.

    Written in DeepSeek's spelling (`rope_theta` + `rope_scaling`), which transformers 4.x and 5.x both read.
    Verse-only options (`moe_layer_freq` > 1, softmax scoring under deepseek_v3, a routing bias under
    deepseek_v2) have no field there, so a warning says transformers will not load the model exactly
    (verse.json, written beside it, keeps the full configuration for Verse).

    Args:
        args (ModelArgs): an MLA configuration.

    Returns:
        Dict[str, Any]: config.json content (without the dtype, which the writer adds).
    """
    if args.attention != "mla":
        raise ConfigError(f"arch {args.arch!r} needs attention='mla'; dense GQA models save as llama/mistral")
    model_type = args.arch if args.arch in MODEL_TYPES else "deepseek_v3"
    v3 = model_type == "deepseek_v3"
    unsupported = []
    if args.is_moe and args.moe_layer_freq != 1:
        unsupported.append(f"moe_layer_freq={args.moe_layer_freq}")
    if args.is_moe and (args.score_func == "sigmoid") != v3:
        unsupported.append(f"score_func={args.score_func!r}")
    if args.is_moe and not v3 and args.router_bias_update_rate > 0:
        unsupported.append("a routing bias")
    if unsupported:
        warnings.warn(f"{model_type}: transformers has no equivalent of {', '.join(unsupported)}; "
                      f"the checkpoint loads exactly in Verse only", stacklevel=2)
    n_routed = args.n_routed_experts if args.is_moe else 0
    config: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "n_routed_experts": n_routed,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "first_k_dense_replace": args.n_dense_layers if n_routed else args.n_layers,
        "scoring_func": args.score_func,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "topk_method": "noaux_tc" if v3 else ("greedy" if args.n_expert_groups == 1 else "group_limited_greedy"),
        "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": args.norm_topk_prob,
        "aux_loss_alpha": args.aux_loss_alpha,
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
    if v3:
        config["rope_interleave"] = True
        config["num_nextn_predict_layers"] = 0
    if args.rope_scaling == "yarn":
        config["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": args.rope_factor,
                                  "original_max_position_embeddings": args.original_seq_len,
                                  "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                                  "mscale": args.mscale, "mscale_all_dim": args.mscale_all_dim}
    elif args.rope_scaling != "none":
        raise ConfigError(f"ModelArgs.rope_scaling: {args.rope_scaling!r} has no DeepSeek equivalent (use yarn)")
    return config


def _rope_rows(args: ModelArgs, key: bool) -> torch.Tensor:
    """Indices of the rotary output rows of a query projection (`key`=False) or of `wkv_a` (`key`=True)."""
    rope = torch.arange(args.qk_rope_head_dim)
    if key:
        return args.kv_lora_rank + rope
    head = args.qk_nope_head_dim + args.qk_rope_head_dim
    return (torch.arange(args.n_heads).unsqueeze(1) * head + args.qk_nope_head_dim + rope).flatten()


def _permute_rope(tensor: torch.Tensor, args: ModelArgs, key: bool, inverse: bool, name: str) -> torch.Tensor:
    """Reorder the rotary rows of each head: interleaved (x0, x1, x2, ...) -> (x0, x2, ..., x1, x3, ...), or back.

    An FP8 weight is permuted as is when each head's rotary rows lie inside one 128-row scale block (true for
    the DeepSeek checkpoints), which keeps its block scales valid.
    """
    rows = _rope_rows(args, key).view(-1, args.qk_rope_head_dim)
    if tensor.element_size() == 1 and bool(((rows[:, 0] // 128) != (rows[:, -1] // 128)).any()):
        raise ConfigError(f"{name}: FP8 rotary rows straddle a 128-row scale block; convert with "
                          f"`verse fp8-to-bf16` first")
    half = args.qk_rope_head_dim // 2
    order = torch.cat((torch.arange(0, 2 * half, 2), torch.arange(1, 2 * half, 2)))
    if inverse:
        order = torch.argsort(order)
    out = tensor.clone()
    out[rows.flatten()] = tensor[rows[:, order].flatten()]
    return out


def _rope_target(module: str, args: ModelArgs) -> Optional[bool]:
    """None when `module` (a Verse layer-relative name) has no rotary rows; else whether it is the key (`wkv_a`)."""
    if module == "attn.wkv_a":
        return True
    if module == ("attn.wq" if args.q_lora_rank == 0 else "attn.wq_b"):
        return False
    return None


def expert_weight(experts: Dict[tuple, torch.Tensor], layer: int, expert: int, hf: str,
                  args: ModelArgs) -> torch.Tensor:
    """Pop one expert's weight from `experts` (keyed (layer, expert, proj, suffix)), dequantized if FP8."""
    name = f"model.layers.{layer}.mlp.experts.{expert}.{hf}.weight"
    weight = experts.pop((layer, expert, hf, "weight"), None)
    if weight is None:
        raise CheckpointError(f"tensor {name} is missing (MoE layer {layer} needs {args.n_routed_experts} experts)")
    scale = experts.pop((layer, expert, hf, "weight_scale_inv"), None)
    if weight.element_size() == 1:
        if scale is None:
            raise CheckpointError(f"tensor {name} is FP8 but {name}_scale_inv is missing")
        weight = weight_dequant(weight, scale, BLOCK_SIZE, getattr(torch, args.dtype))
    return weight


def stack_experts(experts: Dict[tuple, torch.Tensor], layers, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Pop the per-expert weights of each MoE layer in `layers` from `experts` and stack them as Verse stores them.

    Args:
        experts (Dict[tuple, torch.Tensor]): (layer, expert, proj, suffix) -> tensor; emptied.
        layers: the layer indices to stack (dense ones are skipped).
        args (ModelArgs): the model configuration.

    Returns:
        Dict[str, torch.Tensor]: `layers.{i}.ffn.experts.{w1,w2,w3}` -> [n_experts, out, in].

    Raises:
        CheckpointError: an expert's weight is missing. KeyError: an expert left over (of a dense layer, or past
            n_routed_experts), named as in the checkpoint.
    """
    out = {}
    for i in sorted(layers):
        if not args.is_moe_layer(i):
            continue
        for verse, hf in EXPERT_WEIGHTS.items():
            stacked = [expert_weight(experts, i, e, hf, args) for e in range(args.n_routed_experts)]
            out[f"layers.{i}.ffn.experts.{verse}"] = torch.stack(stacked)  # [n_experts, out, in]
    if experts:
        i, e, hf, suffix = next(iter(experts))
        raise KeyError(f"model.layers.{i}.mlp.experts.{e}.{hf}.{suffix}")
    return out


def unstack_experts(layer: str, weight: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Verse's stacked `layers.{layer}.ffn.experts.{weight}` [n_experts, out, in] as Hugging Face's one tensor per
    expert (`model.layers.{layer}.mlp.experts.{e}.{gate,up,down}_proj.weight`)."""
    return {f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_WEIGHTS[weight]}.weight": w.clone()
            for e, w in enumerate(tensor.unbind(0))}


def to_verse(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Hugging Face DeepSeek tensors to Verse names: rename, stack experts, de-interleave the rotary rows.

    Tensors of layers past `n_layers` (DeepSeek-V3's multi-token-prediction layer) are dropped, as transformers does.
    `state_dict` may hold only some whole layers (a loader converting one layer at a time); the experts of each MoE
    layer it has a tensor of must all be there.

    Args:
        state_dict (Dict[str, torch.Tensor]): HF names -> tensors.
        args (ModelArgs): the model configuration.

    Returns:
        Dict[str, torch.Tensor]: Verse names -> tensors.

    Raises:
        KeyError: a tensor name this architecture does not have (the caller reports the file).
        CheckpointError: an expert's tensor is missing.
    """
    hf_to_verse = {hf: verse for verse, hf in GLOBAL_NAMES.items()}
    modules = {hf: verse for verse, hf in LAYER_MODULES.items()}
    suffixes = {hf: verse for verse, hf in SUFFIXES.items()}
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[tuple, torch.Tensor] = {}
    layers = set()
    for name, tensor in state_dict.items():
        if IGNORED.fullmatch(name) or (args.tie_embeddings and name == "lm_head.weight"):
            continue
        if name in hf_to_verse:
            out[hf_to_verse[name]] = tensor
            continue
        layer = HF_LAYER.fullmatch(name)
        if layer is None:
            raise KeyError(name)
        if int(layer.group(1)) >= args.n_layers:
            continue
        layers.add(int(layer.group(1)))
        expert = HF_EXPERT.fullmatch(name)
        if expert:
            experts[int(expert.group(1)), int(expert.group(2)), expert.group(3), expert.group(4)] = tensor
            continue
        module, suffix = modules.get(layer.group(2)), suffixes.get(layer.group(3))
        if module is None or suffix is None:
            raise KeyError(name)
        key = _rope_target(module, args)
        if key is not None and suffix == "weight":
            tensor = _permute_rope(tensor, args, key, inverse=False, name=name)
        out[f"layers.{layer.group(1)}.{module}.{suffix}"] = tensor
    out.update(stack_experts(experts, layers, args))
    return out


def to_hf(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Verse tensors to Hugging Face DeepSeek names: rename, unstack experts, re-interleave the rotary rows.

    Args:
        state_dict (Dict[str, torch.Tensor]): Verse names -> tensors.
        args (ModelArgs): the model configuration.

    Returns:
        Dict[str, torch.Tensor]: HF names -> tensors.
    """
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if args.tie_embeddings and name == "head.weight":
            continue
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = tensor
            continue
        i, module, suffix = VERSE_LAYER.fullmatch(name).groups()
        if module == "ffn.experts":
            out.update(unstack_experts(i, suffix, tensor))
            continue
        key = _rope_target(module, args)
        if key is not None and suffix == "weight":
            tensor = _permute_rope(tensor, args, key, inverse=True, name=name)
        out[f"model.layers.{i}.{LAYER_MODULES[module]}.{SUFFIXES[suffix]}"] = tensor
    return out
