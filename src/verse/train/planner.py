"""Memory and time of a training step before launch: what `verse plan` prints.

Bytes are counted per component the way the trainer allocates them:

- weights: parameters in `param_dtype` (+ fp32 master copies with `bf16_update=master`), plus the bf16 copies
  autocast caches for every matmul weight during forward when parameters are fp32 and compute is bf16;
- grads: one per parameter in its dtype (fp32 when master weights receive them); with `fused_backward` only
  the largest parameter's gradient is ever alive;
- optimizer: AdamW two moments per parameter (fp32 with master weights, else in `param_dtype`); 8-bit AdamW
  (torchao) one byte per moment plus an fp32 scale per 256-value block (tensors under 4096 values stay fp32);
- activations: what autograd saves per layer and token (measured layer by layer with saved-tensor hooks on
  this code: see `_layer_bytes_per_token`); a checkpointed layer keeps only its input, and one layer is
  recomputed at a time in backward;
- logits/loss: one chunk of `loss_chunk_size` tokens of logits in compute dtype (+ an fp32 copy) + log-softmax
  + their gradient, and the gathered hidden states of the loss tokens;
- temporary: the gradient flowing between layers and the recomputed layer's gradient buffers.

Peak = max(backward, optimizer step): weights + optimizer state + all activations + the head's gradient (all
gradients when they accumulate over micro-batches) + the larger of the loss chunk (start of backward) and
the recomputed layer with its gradient buffers (later); or weights + optimizer state + all gradients +
optimizer temporaries.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from verse.config import ModelArgs, _attention_params, count_params
from verse.errors import ConfigError
from verse.model.transformer import torch_dtype
from verse.train.metrics import GPUS, GiB, compute_dtype, flops_per_token

HEADROOM = 0.95  # CUDA context, allocator fragmentation and NCCL buffers take the rest
DEFAULT_MFU = 0.4


@dataclasses.dataclass
class PlanSettings:
    """The knobs of a training step that decide its memory and time (the matching `TrainConfig` fields)."""

    seq_len: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"  # adamw | adamw8bit | sgd
    param_dtype: str = "bfloat16"
    precision: str = "bf16"
    bf16_update: str = "master"  # master | stochastic | nearest
    activation_checkpointing: int = 0  # 0 off, k = every k-th layer
    fused_backward: bool = False
    loss_chunk_size: int = 4096


def check_settings(settings: PlanSettings, flags: Optional[Dict[str, str]] = None) -> None:
    """Reject sizes a step cannot have (a negative sequence would plan negative memory that "fits").

    Args:
        settings (PlanSettings): the step.
        flags (Optional[Dict[str, str]]): how the user spelled each field (e.g. `--seq-len`); default its name.

    Raises:
        ConfigError: naming the first bad field.
    """
    for f in dataclasses.fields(PlanSettings):
        value, low = getattr(settings, f.name), 0 if f.name == "activation_checkpointing" else 1
        if f.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            name = (flags or {}).get(f.name, f.name)
            raise ConfigError(f"{name} {value!r}: must be a {'non-negative' if low == 0 else 'positive'} integer")


def _attn_widths(args: ModelArgs) -> tuple:
    if args.attention == "mla":
        q = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim)
        return q, args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) // 2
    return args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim


def _ffn_width(args: ModelArgs, layer_id: int) -> int:
    if args.is_moe_layer(layer_id):
        return args.moe_inter_dim * (args.n_activated_experts + args.n_shared_experts)
    return args.inter_dim


def _layer_bytes_per_token(args: ModelArgs, layer_id: int, s: PlanSettings) -> float:
    """Bytes autograd saves per token in one layer (coefficients fitted exactly on this code's saved tensors).

    fp32: 24 D + 16 I + 8 Q + 8 KV + 4 H + 8 (the inputs of both norms and their fp32 outputs, q/k/v, the
    attention output and its log-sum-exp, the three SwiGLU hidden tensors and the w2 input, two rstd scalars).
    bf16 compute halves the matrix inputs; the norms stay fp32; an fp32 residual stream adds 10 D.
    """
    D, H = args.dim, args.n_heads
    Q, KV = _attn_widths(args)
    inter = _ffn_width(args, layer_id)
    if s.precision == "fp32" and s.param_dtype == "float32":
        per = 24 * D + 16 * inter + 8 * Q + 8 * KV
    else:
        per = (26 if s.param_dtype == "float32" else 16) * D + 8 * inter + 4 * Q + 4 * KV
    per += 4 * H + 8
    if args.is_moe_layer(layer_id):
        per += 4 * args.n_routed_experts * 3 + 16 * args.n_activated_experts  # router scores, top-k ids/weights
    return per


def _compute_bytes(s: PlanSettings) -> int:
    return compute_dtype(s.precision, s.param_dtype).itemsize


def _param_shapes(args: ModelArgs) -> List[int]:
    """Numels of the model's parameter tensors (experts counted per expert)."""
    D = args.dim
    Q, KV = _attn_widths(args)
    sizes = [args.vocab_size * D, D] + ([] if args.tie_embeddings else [args.vocab_size * D])
    for i in range(args.n_layers):
        sizes += [D, D]
        if args.attention == "gqa":
            sizes += [D * Q, D * KV, D * KV, Q * D]
            sizes += [Q, KV, KV] if args.qkv_bias else []
            sizes += [args.head_dim] * 2 if args.qk_norm else []
        else:
            sizes.append(_attention_params(args))  # several MLA projections; only the total matters here
        if args.is_moe_layer(i):
            sizes += [D * args.moe_inter_dim] * 3 * (args.n_routed_experts + args.n_shared_experts)
            sizes.append(args.n_routed_experts * D)
        else:
            sizes += [D * args.inter_dim] * 3
    return sizes


def _lora_params(args: ModelArgs, rank: int, targets: Sequence[str] = ("all",)) -> Tuple[int, int]:
    """(adapter parameters, frozen matmul parameters they adapt) of LoRA rank `rank` on the `targets` groups."""
    from verse.peft.lora import ATTENTION, GROUPS

    wanted = {name for t in targets for name in GROUPS.get(t, (t,))}
    D = args.dim
    adapter = adapted = 0
    for i in range(args.n_layers):
        shapes = []  # (leaf name, in, out, count)
        if "wq" in wanted or any(t in wanted for t in ATTENTION):
            if args.attention == "gqa":
                Q, KV = _attn_widths(args)
                shapes += [("wq", D, Q, 1), ("wk", D, KV, 1), ("wv", D, KV, 1), ("wo", Q, D, 1)]
            else:
                qk = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim)
                shapes += ([("wq", D, qk, 1)] if args.q_lora_rank == 0 else
                           [("wq_a", D, args.q_lora_rank, 1), ("wq_b", args.q_lora_rank, qk, 1)])
                shapes += [("wkv_a", D, args.kv_lora_rank + args.qk_rope_head_dim, 1),
                           ("wkv_b", args.kv_lora_rank,
                            args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), 1),
                           ("wo", args.n_heads * args.v_head_dim, D, 1)]
        if args.is_moe_layer(i):
            inter, count = args.moe_inter_dim, args.n_shared_experts
            if "experts" in wanted:
                shapes += [("experts", D, inter, 2 * args.n_routed_experts), ("experts", inter, D,
                                                                               args.n_routed_experts)]
        else:
            inter, count = args.inter_dim, 1
        if count:
            shapes += [("w1", D, inter, count), ("w3", D, inter, count), ("w2", inter, D, count)]
        for name, n_in, n_out, n in shapes:
            if name in wanted:
                adapter += rank * (n_in + n_out) * n
                adapted += n_in * n_out * n
    return adapter, adapted


def _layer_matmul_params(args: ModelArgs) -> int:
    """Parameters of the `Linear` layers inside the blocks (what QLoRA stores in NF4; routed experts, stacked,
    stay bf16)."""
    return _lora_params(args, 1, ("attention", "w1", "w2", "w3"))[1]


def _largest_matmul(args: ModelArgs) -> int:
    """Numel of the largest `Linear` weight inside the blocks."""
    Q, KV = _attn_widths(args)
    dense = any(not args.is_moe_layer(i) for i in range(args.n_layers))
    return max(args.dim * max(Q, args.inter_dim if dense else 0,
                              args.moe_inter_dim * max(args.n_shared_experts, 1)), 1)


def plan(args: ModelArgs, settings: Optional[PlanSettings] = None, gpu: str = "a100-80gb",
         mfu: float = DEFAULT_MFU, device_memory: Optional[float] = None, finetune: str = "full",
         lora_rank: int = 8, lora_targets: Sequence[str] = ("all",), rollout_rows: int = 0,
         reference: bool = False) -> Dict[str, Any]:
    """Estimate the memory and time of one training step.

    Args:
        args (ModelArgs): the model.
        settings (Optional[PlanSettings]): sequence length, batch, optimizer, precision, checkpointing, ...
        gpu (str): a key of `GPUS` (its memory and peak FLOP/s), or "cpu" with `device_memory`.
        mfu (float): model FLOPs utilisation assumed for the time estimate.
        device_memory (Optional[float]): bytes available, overriding the GPU's.
        finetune (str): full | lora (frozen base in `param_dtype`) | qlora (frozen base matmul weights in NF4 at
            `NF4_BYTES_PER_PARAM`, the rest bf16); with adapters only they get gradients and optimizer state,
            and each NF4 weight is dequantized to bf16 one matmul at a time.
        lora_rank (int): adapter rank.
        lora_targets (Sequence[str]): adapted groups or leaf names (`verse.peft.lora.GROUPS`).
        rollout_rows (int): GRPO (mode=grpo): completions generated together (prompts_per_step x group_size);
            their KV cache (`seq_len` positions each) and one step of fp32 logits live during the rollout, next
            to the weights and optimizer state; 0 = not GRPO.
        reference (bool): GRPO with beta > 0 and a full fine-tune: a frozen copy of the weights (with LoRA the
            reference is the base with adapters off: nothing more).

    Returns:
        Dict[str, Any]: params, active_params, weights_bytes, grads_bytes, optimizer_bytes, activations_bytes,
        logits_bytes, temp_bytes, peak_bytes, device_bytes, fits, step_time_s, tokens_per_s, settings; with
        GRPO also reference_bytes and generation_bytes.
    """
    s = settings or PlanSettings()
    check_settings(s)
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu}: must be a fraction in (0, 1]")
    spec = GPUS.get(gpu, {"memory": 0.0, "flops": 0.0})
    device_bytes = device_memory if device_memory is not None else spec["memory"] * HEADROOM
    params = count_params(args)
    shapes = _param_shapes(args)
    pbytes = torch_dtype(s.param_dtype).itemsize
    c = _compute_bytes(s)
    low = s.param_dtype != "float32"
    master = low and s.bf16_update == "master"
    tokens = s.micro_batch_size * s.seq_len

    if finetune not in ("full", "lora", "qlora"):
        raise ConfigError(f"finetune {finetune!r}: must be full, lora or qlora")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ConfigError(f"lora rank {lora_rank!r}: must be a positive integer")
    frozen, dequant_temp = 0.0, 0
    if finetune != "full":
        adapter, adapted = _lora_params(args, lora_rank, lora_targets)
        if finetune == "qlora":
            from verse.peft.qlora import NF4_BYTES_PER_PARAM

            layer_matmuls = _layer_matmul_params(args)
            frozen = layer_matmuls * NF4_BYTES_PER_PARAM + (params - layer_matmuls) * 2
            dequant_temp = 2 * 2 * _largest_matmul(args)  # one weight dequantized to bf16 (forward or backward)
        else:
            frozen = params * pbytes
        params_trained, shapes = adapter, [adapter]
    else:
        params_trained = params
    weights = frozen + params_trained * pbytes + (4 * params_trained if master else 0)
    matmul_params = params - args.vocab_size * args.dim - (2 * args.n_layers + 1) * args.dim  # all but embed, norms
    # autocast caches bf16 copies of fp32 weights that require grad (frozen base weights are cast per use)
    autocast_copies = (2 * (matmul_params if finetune == "full" else params_trained)
                       if (s.precision == "bf16" and not low) else 0)
    grad_bytes = 4 if master else pbytes
    largest = max(shapes)
    grads = (largest * (grad_bytes + (4 if master else 0)) if s.fused_backward
             else params_trained * grad_bytes)
    params = params_trained if finetune != "full" else params
    state_bytes = 4 if (master or not low) else pbytes
    if s.optimizer == "adamw8bit":
        big = sum(n for n in shapes if n >= 4096 and n % 256 == 0)
        optimizer = 2 * big + 2 * 4 * big // 256 + 2 * state_bytes * (params - big)
        optimizer_temp = 3 * 4 * largest  # one parameter's moments dequantized to fp32 inside its step
    elif s.optimizer == "sgd":
        optimizer, optimizer_temp = state_bytes * params, 0
    else:
        optimizer, optimizer_temp = 2 * state_bytes * params, 0

    # QLoRA's bf16 base makes the residual stream and every matmul bf16, whatever the adapters' dtype
    act = dataclasses.replace(s, precision="bf16", param_dtype="bfloat16") if finetune == "qlora" else s
    c = _compute_bytes(act)
    layer_full = [_layer_bytes_per_token(args, i, act) * tokens for i in range(args.n_layers)]
    resid = 4 if act.param_dtype == "float32" else 2  # the residual stream's dtype
    k = s.activation_checkpointing
    checkpointed = [k > 0 and i % k == 0 for i in range(args.n_layers)]
    activations = sum(resid * args.dim * tokens if ck else full for ck, full in zip(checkpointed, layer_full))
    activations += tokens * (8 + 8 * args.dim + 4)  # ids, embedding output, final-norm input and rstd
    recompute = max((full for ck, full in zip(checkpointed, layer_full) if ck), default=0)
    chunk = min(s.loss_chunk_size, tokens)
    # one chunk: logits in compute dtype, their fp32 copy (none when computing in fp32), log-softmax, gradient
    logits = chunk * args.vocab_size * (c + (4 if c != 4 else 0) + 4 + 4) + tokens * args.dim * c
    temp = 2 * tokens * args.dim * 4 + recompute + dequant_temp  # grads between layers, the recomputed layer
    head_grad = args.vocab_size * args.dim * grad_bytes if finetune == "full" else 0
    persistent_grads = grads if s.gradient_accumulation_steps > 1 and not s.fused_backward else 0
    # the loss chunks run first in backward and are freed before any layer is recomputed
    backward_peak = (weights + autocast_copies + optimizer + activations + max(logits, temp)
                     + max(head_grad, persistent_grads))
    step_peak = weights + optimizer + grads + optimizer_temp
    reference_bytes = count_params(args) * pbytes if reference and finetune == "full" else 0
    generation = 0
    if rollout_rows:
        from verse.model.mla import cache_bytes_per_token

        cache_dtype = torch_dtype("bfloat16" if finetune == "qlora" else s.param_dtype)
        generation = rollout_rows * (s.seq_len * cache_bytes_per_token(args, dtype=cache_dtype)
                                     + args.vocab_size * 4 * 2)  # the cache; one step's logits and probabilities
    peak = max(backward_peak, step_peak, weights + optimizer + generation) + reference_bytes

    flops = flops_per_token(args, s.seq_len) * (1 + (1 / 3 if k else 0) / max(k, 1))  # recompute = +1 forward
    step_tokens = tokens * s.gradient_accumulation_steps
    step_time = step_tokens * flops / (spec["flops"] * mfu) if spec["flops"] else None
    return {
        "params": count_params(args), "active_params": count_params(args, active=True),
        "finetune": finetune, "trainable_params": params,
        **({"lora_rank": lora_rank, "lora_targets": list(lora_targets)} if finetune != "full" else {}),
        "weights_bytes": weights + autocast_copies, "grads_bytes": grads, "optimizer_bytes": optimizer,
        "activations_bytes": activations, "logits_bytes": logits, "temp_bytes": temp + optimizer_temp,
        "peak_bytes": peak, "device_bytes": device_bytes, "fits": bool(device_bytes and peak <= device_bytes),
        **({"reference_bytes": reference_bytes, "generation_bytes": generation} if rollout_rows else {}),
        "gpu": gpu, "mfu": mfu, "step_time_s": step_time,
        "tokens_per_s": step_tokens / step_time if step_time else None,
        "settings": dataclasses.asdict(s),
    }


# cheapest first: moves that cost no quality, then throughput, then sequence length
MOVES = [
    ("fused_backward=true grad_clip=0", dict(fused_backward=True, gradient_accumulation_steps=1)),
    ("activation_checkpointing=1", dict(activation_checkpointing=1)),
    ("optimizer=adamw8bit", dict(optimizer="adamw8bit")),
    ("param_dtype=bfloat16 bf16_update=stochastic", dict(param_dtype="bfloat16", bf16_update="stochastic")),
    ("micro_batch_size=1", dict(micro_batch_size=1)),
]


def suggestions(args: ModelArgs, settings: PlanSettings, gpu: str, device_memory: Optional[float] = None,
                limit: int = 3, **finetune: Any) -> List[Dict[str, Any]]:
    """The cheapest combinations of `MOVES` (fewest moves first) that make the run fit, with their peak
    (`finetune`: `plan`'s finetune, lora_rank, lora_targets)."""
    from itertools import combinations

    found: List[Dict[str, Any]] = []
    for n in range(1, len(MOVES) + 1):
        for combo in combinations(MOVES, n):
            changes: Dict[str, Any] = {}
            for _, change in combo:
                changes.update(change)
            if all(getattr(settings, key) == value for key, value in changes.items()):
                continue
            result = plan(args, dataclasses.replace(settings, **changes), gpu, device_memory=device_memory,
                          **finetune)
            if result["fits"] and not any(set(f["moves"]) <= {m for m, _ in combo} for f in found):
                found.append({"moves": [m for m, _ in combo], "peak_bytes": result["peak_bytes"]})
            if len(found) >= limit:
                return found
    seq = settings.seq_len
    while seq > 128 and len(found) < limit:
        seq //= 2
        result = plan(args, dataclasses.replace(settings, seq_len=seq), gpu, device_memory=device_memory,
                      **finetune)
        if result["fits"]:
            found.append({"moves": [f"max_seq_len={seq}"], "peak_bytes": result["peak_bytes"]})
            break
    return found


# PlanSettings fields whose TrainConfig field has another name (every other field has the same name)
CONFIG_NAMES = {"seq_len": "max_seq_len"}


def settings_from_config(cfg: Any) -> PlanSettings:
    """`PlanSettings` from a `TrainConfig`."""
    return PlanSettings(**{f.name: getattr(cfg, CONFIG_NAMES.get(f.name, f.name))
                           for f in dataclasses.fields(PlanSettings)})


def config_fields(settings: PlanSettings) -> Dict[str, Any]:
    """The `TrainConfig` fields of `settings` (the inverse of `settings_from_config`): every field, by name."""
    return {CONFIG_NAMES.get(f.name, f.name): getattr(settings, f.name) for f in dataclasses.fields(PlanSettings)}


def plan_from_config(cfg: Any, args: ModelArgs, gpu: str = "a100-80gb") -> Dict[str, Any]:
    """`plan` for a `TrainConfig` and the model it trains (its `finetune:` section included)."""
    return plan(args, settings_from_config(cfg), gpu, **finetune_from_config(cfg))


def finetune_from_config(cfg: Any) -> Dict[str, Any]:
    """`plan`'s finetune, lora_rank and lora_targets of a `TrainConfig`, and for mode=grpo its rollout_rows and
    reference."""
    lora = cfg.lora_args() if hasattr(cfg, "lora_args") else None
    grpo = cfg.grpo_args() if hasattr(cfg, "grpo_args") else None
    out: Dict[str, Any] = {}
    if grpo is not None:
        out.update(rollout_rows=grpo.prompts_per_step * grpo.group_size, reference=grpo.beta > 0)
    if lora is not None:
        out.update(finetune=cfg.finetune_method, lora_rank=lora.rank, lora_targets=lora.targets)
    return out


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def format_plan(args: ModelArgs, result: Dict[str, Any], moves: List[Dict[str, Any]]) -> str:
    """Human-readable plan (what `verse plan` prints without --json)."""
    s = result["settings"]
    lines = [f"params: {result['params'] / 1e9:.3f} B total, {result['active_params'] / 1e9:.3f} B active",
             f"step: micro_batch {s['micro_batch_size']} x seq {s['seq_len']} x accumulation "
             f"{s['gradient_accumulation_steps']}; {s['param_dtype']} params, {s['precision']} compute, "
             f"{s['optimizer']}{' (fused into backward)' if s['fused_backward'] else ''}, checkpointing "
             f"{'every ' + str(s['activation_checkpointing']) if s['activation_checkpointing'] else 'off'}"]
    if result.get("finetune", "full") != "full":
        lines.append(f"fine-tune: {result['finetune']} rank {result['lora_rank']} on "
                     f"{', '.join(result['lora_targets'])}: {result['trainable_params'] / 1e6:.1f} M trainable "
                     f"parameters{', base in NF4' if result['finetune'] == 'qlora' else ', base frozen'}")
    keys = ["weights", "grads", "optimizer", "activations", "logits", "temp"]
    if "generation_bytes" in result:  # GRPO: the frozen reference and the rollout's KV cache
        keys += ["reference", "generation"]
    for key in keys:
        lines.append(f"  {key + ':':<13}{format_bytes(result[key + '_bytes']):>12}")
    lines.append(f"  {'peak:':<13}{format_bytes(result['peak_bytes']):>12}   of {format_bytes(result['device_bytes'])}"
                 f" usable on {result['gpu']} -> {'FITS' if result['fits'] else 'DOES NOT FIT'}")
    if result["step_time_s"]:
        lines.append(f"time: {result['step_time_s']:.2f} s/step, {result['tokens_per_s']:,.0f} tokens/s at "
                     f"{result['mfu']:.0%} MFU")
    if not result["fits"]:
        lines.append("cheapest changes that fit:" if moves else "no combination of the usual moves fits")
        lines += [f"  {' '.join(m['moves'])}  -> peak {format_bytes(m['peak_bytes'])}" for m in moves]
    return "\n".join(lines)
