"""Hugging Face adapter for the Qwen family: `Qwen2ForCausalLM` (Qwen2/2.5), `Qwen3ForCausalLM` and
`Qwen3MoeForCausalLM`.

They keep Llama's tensor names and RoPE layout (`verse.interop.llama`) and add: biases on the query/key/value
projections (Qwen2: `ModelArgs.qkv_bias`), a per-head RMSNorm of queries and keys (Qwen3: `qk_norm`,
`self_attn.{q,k}_norm.weight`) and, in Qwen3-MoE, a softmax router (`mlp.gate.weight`) over routed experts without a
shared one, stored per expert (`mlp.experts.E.{gate,up,down}_proj.weight`) and stacked in Verse as the DeepSeek
adapter stacks them. A Qwen3-MoE layer i is sparse when i is not in `mlp_only_layers` and
(i + 1) % `decoder_sparse_step` == 0, i.e. Verse's `n_dense_layers = step - 1`, `moe_layer_freq = step`.
"""

from typing import Any, Dict

import torch

from verse.config import ModelArgs
from verse.errors import ConfigError
from verse.interop import llama
from verse.interop.deepseek import HF_EXPERT, stack_experts, unstack_experts

MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# Verse name <- HF name inside a layer: Llama's, plus the biases, the q/k norms and the MoE router
LAYER_NAMES = {
    **llama.LAYER_NAMES,
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
}
GLOBAL_NAMES = llama.GLOBAL_NAMES
HF_FIELDS = {**llama.HF_FIELDS, "n_routed_experts": "num_experts", "n_activated_experts": "num_experts_per_tok",
             "moe_inter_dim": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob",
             "mlp_only_layers": "mlp_only_layers"}


def args_from_hf(config: Dict[str, Any]) -> ModelArgs:
    """`ModelArgs` of a Hugging Face Qwen2/Qwen3/Qwen3-MoE `config.json` (transformers 4.x or 5.x spelling).

    Args:
        config (Dict[str, Any]): the parsed config.json; a missing required field raises `KeyError`.

    Returns:
        ModelArgs: the architecture (execution fields at their defaults).
    """
    model_type = config["model_type"]
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a Qwen2/Qwen3/Qwen3-MoE model")
    if config.get("use_sliding_window") and "sliding_attention" in (config.get("layer_types") or ["sliding_attention"]):
        raise ConfigError("use_sliding_window=true is not supported (Verse applies one window to every layer, Qwen "
                          "from max_window_layers on); set it to false")
    if model_type != "qwen2" and config.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported for Qwen3 (a bias on the output projection too)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (only silu, i.e. SwiGLU)")
    n_heads = config["num_attention_heads"]
    eos = config.get("eos_token_id")
    max_seq_len = config["max_position_embeddings"]
    # transformers' defaults: Qwen3 head_dim 128, Qwen2 and Qwen3-MoE hidden_size // num_attention_heads
    head_dim = config.get("head_dim") or (128 if model_type == "qwen3" else None)
    fields = dict(
        arch=model_type,
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        inter_dim=config["intermediate_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len,
        original_seq_len=max_seq_len,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type != "qwen2",
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        tokenizer="hf",
    )
    if model_type == "qwen3_moe":
        step = config.get("decoder_sparse_step")
        step = 1 if step is None else step
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError(f"field 'decoder_sparse_step': must be a positive integer, got {step!r:.40}")
        fields.update(n_routed_experts=config.get("num_experts", config.get("num_local_experts")),
                      n_activated_experts=config["num_experts_per_tok"],
                      moe_inter_dim=config["moe_intermediate_size"], norm_topk_prob=config.get("norm_topk_prob", False),
                      n_dense_layers=step - 1, moe_layer_freq=step,
                      mlp_only_layers=config.get("mlp_only_layers") or [], score_func="softmax")
    fields.update(llama.rope_from_hf(config))
    return ModelArgs(**fields)


def check_saveable(args: ModelArgs, model_type: str) -> None:
    """Raise `ConfigError` for a configuration transformers' class of `model_type` cannot hold exactly."""
    wanted = {"qkv_bias": model_type == "qwen2", "qk_norm": model_type != "qwen2"}
    for name, value in wanted.items():
        if getattr(args, name) != value:
            raise ConfigError(f"ModelArgs.{name}: {ARCHITECTURES[model_type]} always has {name}={value}; "
                              f"set it, or save as another arch", name)
    problems = {"attention": args.attention != "gqa", "sliding_window": args.sliding_window is not None,
                "n_routed_experts": args.is_moe != (model_type == "qwen3_moe")}
    if model_type == "qwen3_moe":
        problems.update(n_shared_experts=args.n_shared_experts != 0, score_func=args.score_func != "softmax",
                        n_expert_groups=args.n_expert_groups != 1, route_scale=args.route_scale != 1.0,
                        router_bias_update_rate=args.router_bias_update_rate != 0)
    bad = next((name for name, wrong in problems.items() if wrong), None)
    if bad:
        raise ConfigError(f"ModelArgs.{bad}: {getattr(args, bad)!r} has no equivalent in "
                          f"{ARCHITECTURES[model_type]}", bad)


def hf_config(args: ModelArgs) -> Dict[str, Any]:
    """The Hugging Face `config.json` of a Qwen-family Verse model (4.x spelling, which 5.x also reads).

    Args:
        args (ModelArgs): a configuration of arch qwen2, qwen3 or qwen3_moe.

    Returns:
        Dict[str, Any]: config.json content (without the dtype, which the writer adds).
    """
    model_type = args.arch
    check_saveable(args, model_type)
    config = llama.hf_config(args.replace(arch="llama", qkv_bias=False, qk_norm=False, n_routed_experts=0))
    del config["mlp_bias"]
    config.update(architectures=[ARCHITECTURES[model_type]], model_type=model_type, use_sliding_window=False,
                  sliding_window=None, max_window_layers=args.n_layers)
    if model_type == "qwen2":
        del config["head_dim"], config["attention_bias"]  # Qwen2: head_dim = hidden_size / heads; biases always
        if args.head_dim * args.n_heads != args.dim:
            raise ConfigError(f"ModelArgs.head_dim: Qwen2ForCausalLM needs head_dim * n_heads == dim "
                              f"({args.head_dim} * {args.n_heads} != {args.dim})", "head_dim")
    if model_type == "qwen3_moe":
        # Verse's layout as HF's: a sparse step when the dense prefix is exactly step - 1 layers, else every dense
        # layer listed in mlp_only_layers
        exact = args.n_dense_layers == args.moe_layer_freq - 1
        dense = [i for i in range(args.n_layers) if not args.is_moe_layer(i)]
        config.update(num_experts=args.n_routed_experts, num_experts_per_tok=args.n_activated_experts,
                      moe_intermediate_size=args.moe_inter_dim, norm_topk_prob=args.norm_topk_prob,
                      decoder_sparse_step=args.moe_layer_freq if exact else 1,
                      mlp_only_layers=list(args.mlp_only_layers) if exact else dense,
                      output_router_logits=False, router_aux_loss_coef=0.0)
    return config


def to_verse(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Hugging Face Qwen tensors to Verse names; each MoE layer's per-expert weights stacked [n_experts, ...].

    `state_dict` may hold only some whole layers (a loader converting one layer at a time).

    Args:
        state_dict (Dict[str, torch.Tensor]): HF names -> tensors.
        args (ModelArgs): the model configuration.

    Returns:
        Dict[str, torch.Tensor]: Verse names -> tensors.

    Raises:
        KeyError: a tensor name this architecture does not have (the caller reports the file).
        CheckpointError: an expert's tensor is missing.
    """
    experts: Dict[tuple, torch.Tensor] = {}
    rest = {}
    for name, tensor in state_dict.items():
        expert = HF_EXPERT.fullmatch(name)
        if expert:
            experts[int(expert.group(1)), int(expert.group(2)), expert.group(3), expert.group(4)] = tensor
        else:
            rest[name] = tensor
    out = llama.to_verse(rest, args, LAYER_NAMES)
    out.update(stack_experts(experts, {key[0] for key in experts}, args))
    return out


def to_hf(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Verse tensors to Hugging Face Qwen names; stacked experts written one tensor per expert.

    Args:
        state_dict (Dict[str, torch.Tensor]): Verse names -> tensors.
        args (ModelArgs): the model configuration.

    Returns:
        Dict[str, torch.Tensor]: HF names -> tensors.
    """
    out: Dict[str, torch.Tensor] = {}
    rest = {}
    for name, tensor in state_dict.items():
        layer = llama.VERSE_LAYER.fullmatch(name)
        if layer and layer.group(2).startswith("ffn.experts."):
            out.update(unstack_experts(layer.group(1), layer.group(2).removeprefix("ffn.experts."), tensor))
        else:
            rest[name] = tensor
    out.update(llama.to_hf(rest, args, LAYER_NAMES))
    return out
