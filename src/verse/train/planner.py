"""Memory and time of a training step before launch: what `verse plan` prints.

Bytes are counted per component the way the trainer allocates them:

- weights: parameters in `param_dtype` (+ fp32 master copies with `bf16_update=master`), plus the bf16 copies
  autocast caches for every matmul weight during forward when parameters are fp32 and compute is bf16; with
  `precision: fp8` only for the matmuls torchao leaves in bf16 (head, routers, routed experts): its `Float8Linear`
  casts the blocks' weights to float8 at each use and keeps only the fp32 parameter for backward;
- grads: one per parameter in its dtype (fp32 when master weights receive them); with `fused_backward` only
  the largest parameter's gradient is ever alive;
- optimizer: AdamW two moments per parameter (fp32 with master weights, else in `param_dtype`); 8-bit AdamW
  (torchao) one byte per moment plus an fp32 scale per 256-value block (tensors under 4096 values stay fp32);
- activations: what autograd saves per layer and token (measured layer by layer with saved-tensor hooks on
  this code: see `_layer_bytes_per_token`, `_mla_bytes`, `_moe_bytes`), the final norm's and the forward's RoPE
  tables; a checkpointed layer keeps only its input, and one layer is
  recomputed at a time in backward; fp8 (torchao 0.18's `matmul_with_hp_or_float8_args`) saves each converted
  layer's input as it came in, bf16 under autocast, as bf16 does: the same bytes (float8 copies are kept only
  where `torch.compile` chooses them; not counted);
- logits/loss: one chunk of `loss_chunk_size` tokens at its backward: the fp32 log-softmax, its incoming and
  outgoing gradients (bf16 logits are gone by then), and the gathered hidden states of the loss tokens; with
  tensor parallelism each rank's vocab_size / tp columns of them, plus the saved fp32 logits (`loss_parallel`);
- tensor parallelism (`tp`) divides the heads, the MLP width, the embedding and the head; with its sequence
  parallelism the residual stream between blocks, the norms and the gradients between layers hold tokens / tp;
- temporary: the gradient flowing between layers and the recomputed layer's gradient buffers.

Peak = max(backward, optimizer step): weights + optimizer state + all activations + the head's gradient (all
gradients when they accumulate over micro-batches) + the larger of the loss chunk (start of backward) and
the recomputed layer with its gradient buffers (later); or weights + optimizer state + all gradients +
optimizer temporaries.
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from verse.config import ModelArgs, _attention_params, count_params
from verse.errors import ConfigError
from verse.model.mla import pads_values
from verse.model.transformer import torch_dtype
from verse.train.distributed import ParallelConfig
from verse.train.metrics import GPUS, GPUS_PER_NODE, GiB, compute_dtype, flops_per_token

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


def _math_attention(args: ModelArgs, gpu: str) -> bool:
    """Whether SDPA falls back to its math kernel: on CPU (`gpu` "cpu") when MLA's values are wider than its
    queries/keys (CPU's flash kernel needs equal widths; narrower values are padded, `verse.model.mla.pads_values`;
    CUDA's memory-efficient kernel takes any)."""
    return gpu == "cpu" and args.attention == "mla" and (
        args.qk_nope_head_dim + args.qk_rope_head_dim < args.v_head_dim)


def _padded_values(args: ModelArgs, gpu: str) -> bool:
    """Whether MLA pads its values to the query/key width for SDPA (`verse.model.mla.pads_values`)."""
    return args.attention == "mla" and pads_values(torch.device("cpu" if gpu == "cpu" else "cuda"),
                                                   args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim)


def _layer_bytes_per_token(args: ModelArgs, layer_id: int, s: PlanSettings, tp: int = 1,
                           math_attention: bool = False, padded_values: bool = False) -> float:
    """Bytes autograd saves per token in one layer (each term the tensor an op saves; measured with saved-tensor
    hooks on this code in fp32, bf16 autocast over fp32 or bf16 parameters, 1 and 2 gloo ranks).

    Per norm: its fp32 input (`x.float()`), the normalized tensor in the residual dtype (saved by `* weight`) and
    the rstd; its output is saved once by the matmuls that read it, or once per matmul as autocast's bf16 cast of
    fp32 activations. GQA: q/k/v, the attention output and its log-sum-exp, the `wo` input (the dense formula
    24 D + 16 I + 8 Q + 8 KV + 4 H + 8 in fp32), and with `qk_norm` the per-head norms' tensors. MLA (attn_impl
    naive, as training runs it) and MoE: see `_mla_bytes` and `_moe_bytes`. Tensor parallelism (`tp`) divides the
    heads and a dense MLP's hidden width; its sequence parallelism runs the norms on a 1/tp part of each sequence
    (their tensors and rstd divided by tp; the matmul inputs are gathered whole); MLA's latent projections and an
    MoE layer run whole on every tp rank.
    """
    D, H = args.dim, args.n_heads // tp
    c = _compute_bytes(s)
    resid = torch_dtype(s.param_dtype).itemsize
    autocast = c < resid  # fp32 activations cast to bf16 per matmul
    moe = args.is_moe_layer(layer_id)
    # matmuls reading the attention norm's output, then the FFN norm's (MoE: the router, the shared w1/w3)
    readers = (2 if args.attention == "mla" else 3) + (1 + 2 * bool(args.n_shared_experts) if moe else 2)
    per = ((8 + 2 * resid) * D + 8) / tp  # the two norms: fp32 inputs, normalized tensors, rstd
    # their outputs as matmul inputs; with bf16 parameters an MoE router reads a copy (`x.float()`), so without
    # shared experts nothing keeps the FFN norm's output itself
    shared_output = not moe or args.n_shared_experts > 0 or c == 4
    per += 2 * D * readers if autocast else resid * D * (1 + shared_output)
    if args.attention == "mla":
        per += _mla_bytes(args, c, tp, s.seq_len if math_attention else 0, padded_values)
    else:
        Q, KV = (w // tp for w in _attn_widths(args))
        per += c * (2 * Q + 2 * KV) + 4 * H
        if args.qk_norm:  # per-head q/k RMSNorms: fp32 input, normalized tensor (compute dtype), rstd per head
            per += (4 + c) * (Q + KV) + 4 * (H + args.n_kv_heads // tp)
    if moe:
        per += _moe_bytes(args, c, resid, autocast)
    else:
        per += 4 * c * args.inter_dim // tp  # SwiGLU: w1 and w3 outputs, silu output, the w2 input
    return per


def _latent_norm_bytes(width: int, stored: int, c: int) -> int:
    """An MLA latent RMSNorm's saved bytes per token: its input (fp32: the projection's whole output of `stored`
    columns it is a slice of; bf16: the fp32 copy), rstd, the normalized latent and its output as the next
    matmul's input, in the compute dtype."""
    return 4 * (stored if c == 4 else width) + 4 + 2 * c * width


def _mla_bytes(args: ModelArgs, c: int, tp: int, math_seq_len: int = 0, padded_values: bool = False) -> float:
    """MLA attention's saved bytes per token (attn_impl naive), past its input: the latent norms, the per-head query
    and key concatenations, the values (a view of `wkv_b`'s whole output), SDPA's output and log-sum-exp and the
    `wo` input (the output made contiguous); with values padded to the key width (`padded_values`) SDPA saves the
    padded copy and its padded output instead; with SDPA's math kernel (`math_seq_len`: the sequence length) it
    saves fp32 copies of q, k, v and the softmax probabilities (seq_len per head and token) instead."""
    H = args.n_heads // tp
    qk, rope, v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    per = _latent_norm_bytes(args.kv_lora_rank, args.kv_lora_rank + rope, c)
    if args.q_lora_rank:
        per += _latent_norm_bytes(args.q_lora_rank, args.q_lora_rank, c)
    if math_seq_len:
        per += 4 * H * (2 * qk + v + math_seq_len) + c * H * v  # fp32 q, k, v, probabilities; the wo input
    else:
        # q and k (H x qk each), v's storage (H x (nope + v), or its padded copy H x qk), the output (H x v, or
        # padded H x qk), its log-sum-exp, the wo input
        values, out = (qk, qk) if padded_values else (args.qk_nope_head_dim + v, v)
        per += c * H * (2 * qk + values + out) + 4 * H + c * H * v
    return per


def _moe_bytes(args: ModelArgs, c: int, resid: int, autocast: bool) -> float:
    """An MoE layer's saved bytes per token, past its input (see `verse.model.moe.MoE.forward`)."""
    D, k, E, G = args.dim, args.n_activated_experts, args.n_routed_experts, args.n_expert_groups
    per = 4 * E + 8 * k + 4 + c * k  # router: scores, top-k ids, the weights' sum and the weights (gather)
    if c == 2 and not autocast:  # bf16 parameters: autocast casts the router's `x.float()` back for its linear
        per += 2 * D
    if G > 1:  # group-limited routing: per-group top-2 ids, the kept groups, the group mask
        per += 16 * G + 8 * args.n_limited_groups + G
    per += 16 * k + c * k  # the (token, slot) order and token ids, the weights in that order
    per += c * k * D  # the experts' gathered input (grouped_mm / linear input)
    per += 4 * c * k * args.moe_inter_dim  # each expert's SwiGLU hidden tensors
    per += c * k * D + resid * k * D  # the experts' output (saved by `* weights`) and `index_add_`'s source
    per += 4 * c * args.moe_inter_dim * args.n_shared_experts  # the shared experts' SwiGLU
    return per + 4  # the balance loss' per-token score sums


def _compute_bytes(s: PlanSettings) -> int:
    return compute_dtype(s.precision, s.param_dtype).itemsize


def _param_tensors(args: ModelArgs) -> List[Tuple[int, int, str]]:
    """The model's parameter tensors as (numel, layer, split): layer -1 for the root (embedding, final norm, head);
    split "tp" for the weights tensor parallelism divides (`apply_tp`: embedding and head by vocabulary, attention
    heads, the dense MLP), "expert" for the stacked routed experts (divided by `ep`), "rep" for the rest (norms,
    MLA's latent down-projections, the router, the shared experts: whole on every tp rank)."""
    D, out = args.dim, []
    Q, KV = _attn_widths(args)
    out += [(args.vocab_size * D, -1, "tp"), (D, -1, "rep")]
    if not args.tie_embeddings:
        out.append((args.vocab_size * D, -1, "tp"))
    for i in range(args.n_layers):
        out += [(D, i, "rep"), (D, i, "rep")]
        if args.attention == "gqa":
            out += [(D * Q, i, "tp"), (D * KV, i, "tp"), (D * KV, i, "tp"), (Q * D, i, "tp")]
            out += [(Q, i, "tp"), (KV, i, "tp"), (KV, i, "tp")] if args.qkv_bias else []
            out += [(args.head_dim, i, "rep")] * 2 if args.qk_norm else []
        else:
            H, qk = args.n_heads, args.qk_nope_head_dim + args.qk_rope_head_dim
            r, c = args.q_lora_rank, args.kv_lora_rank
            out += ([(D * H * qk, i, "tp")] if r == 0 else [(D * r, i, "rep"), (r, i, "rep"), (r * H * qk, i, "tp")])
            out += [(D * (c + args.qk_rope_head_dim), i, "rep"), (c, i, "rep"),
                    (c * H * (args.qk_nope_head_dim + args.v_head_dim), i, "tp"), (H * args.v_head_dim * D, i, "tp")]
        if args.is_moe_layer(i):
            out += [(args.n_routed_experts * D * args.moe_inter_dim, i, "expert")] * 3
            out += [(D * args.moe_inter_dim * args.n_shared_experts, i, "rep")] * (3 if args.n_shared_experts else 0)
            out.append((args.n_routed_experts * D, i, "rep"))
        else:
            out += [(D * args.inter_dim, i, "tp")] * 3
    return out


def _param_shapes(args: ModelArgs) -> List[int]:
    """Numels of the model's parameter tensors (routed experts stacked, one tensor per projection)."""
    return [n for n, _, _ in _param_tensors(args)]


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
    """Parameters of the `Linear` layers inside the blocks (what QLoRA stores in NF4 and `precision: fp8` trains in
    float8; the routers and the stacked routed experts stay bf16)."""
    return _lora_params(args, 1, ("attention", "w1", "w2", "w3"))[1]


def _largest_matmul(args: ModelArgs) -> int:
    """Numel of the largest `Linear` weight inside the blocks."""
    Q, KV = _attn_widths(args)
    dense = any(not args.is_moe_layer(i) for i in range(args.n_layers))
    return max(args.dim * max(Q, args.inter_dim if dense else 0,
                              args.moe_inter_dim * max(args.n_shared_experts, 1)), 1)


def _sharding(args: ModelArgs, parallel: ParallelConfig) -> Dict[str, Any]:
    """What one rank of `parallel` holds, as `verse.train.parallelize` lays the model out.

    Tensor parallelism divides the "tp" tensors of `_param_tensors` by `tp`; expert parallelism the stacked routed
    experts by `ep`; FSDP2 then shards every dense tensor over `dp_shard x ep` ranks (the `dp_shard_ep` mesh) and the
    experts over `dp_shard`; `dp_replicate` holds full copies (HSDP). FSDP2 runs when the data-parallel mesh has
    more than one rank.

    Returns:
        Dict[str, Any]: rank_shapes (each tensor's numel on this rank), block_full (each block's numel unsharded,
        still split by tp/ep: what FSDP2 all-gathers), root_full (embedding, final norm and head unsharded), fsdp
        (whether FSDP2 runs), gather (numel this rank receives per all-gather of every tensor, by shard group:
        "dense" over dp_shard x ep, "expert" over dp_shard).
    """
    tp, ep, shard = parallel.tp, parallel.ep, parallel.dp_shard
    rank_shapes, block_full, root_full = [], [0.0] * args.n_layers, 0.0
    gather = {"dense": 0.0, "expert": 0.0}
    for n, layer, split in _param_tensors(args):
        full = n / (tp if split == "tp" else ep if split == "expert" else 1)
        ranks = shard if split == "expert" else shard * ep
        rank_shapes.append(math.ceil(full / ranks))
        gather["expert" if split == "expert" else "dense"] += full * (ranks - 1) / ranks
        if layer < 0:
            root_full += full
        else:
            block_full[layer] += full
    return {"rank_shapes": rank_shapes, "block_full": block_full, "root_full": root_full, "gather": gather,
            "fsdp": parallel.dp_replicate * shard * ep > 1}


def _comm_time(args: ModelArgs, s: PlanSettings, parallel: ParallelConfig, sharding: Dict[str, Any],
               spec: Dict[str, Any], compute_time: float, fsdp_mp: bool) -> float:
    """Seconds of communication a step adds to its compute (a simple model; no latency term).

    Assumes ring collectives at the table's per-direction bandwidth (`GPUS` "link" inside a node of
    `GPUS_PER_NODE`, "network" when a group's ranks span nodes; mesh order dp_replicate x dp_shard x ep x tp, tp
    innermost); FSDP2's all-gathers (forward and backward, every micro-batch) and reduce-scatters, and HSDP's
    all-reduce, overlap with compute (only what exceeds it counts); tensor-parallel all-reduces (two per block in
    forward, two in backward) and expert-parallel all-to-alls (dispatch and combine, forward and backward) wait.
    """
    tp, ep, shard, rep = parallel.tp, parallel.ep, parallel.dp_shard, parallel.dp_replicate

    def bandwidth(stride: int, size: int) -> float:
        return spec["link"] if stride * size <= GPUS_PER_NODE else spec["network"]

    pbytes = torch_dtype(s.param_dtype).itemsize
    gather_bytes, reduce_bytes = (2, 4) if fsdp_mp else (pbytes, pbytes)
    c, micro, tokens, D = _compute_bytes(s), s.gradient_accumulation_steps, s.micro_batch_size * s.seq_len, args.dim
    hidden = sharding["gather"]
    overlapped = micro * (2 * gather_bytes + reduce_bytes) * (hidden["dense"] / bandwidth(tp, shard * ep)
                                                             + hidden["expert"] / bandwidth(tp * ep, shard))
    if rep > 1:  # HSDP: the reduce-scattered gradient shards are all-reduced over the replicas once per step
        overlapped += 2 * (rep - 1) / rep * sum(sharding["rank_shapes"]) * reduce_bytes / bandwidth(
            tp * ep * shard, rep)
    waiting = 0.0
    # tp: per block 2 + 2 all-reduces' worth of activations (sequence parallelism: an all-gather before attention and
    # the FFN and a reduce-scatter after, mirrored in backward), the embedding's and the final norm's; loss_parallel
    # exchanges per-token maxima, sums and target logits (fp32), never the logits
    if tp > 1:
        ring = 2 * (tp - 1) / tp
        waiting += micro * ring * ((4 * args.n_layers + 2) * tokens * D * c + 3 * tokens * 4) / bandwidth(1, tp)
    if ep > 1:
        moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers))
        waiting += micro * moe_layers * 4 * tokens * args.n_activated_experts * D * c * (ep - 1) / ep / bandwidth(
            tp, ep)
    return waiting + max(0.0, overlapped - compute_time)


def plan(args: ModelArgs, settings: Optional[PlanSettings] = None, gpu: str = "a100-80gb",
         mfu: float = DEFAULT_MFU, device_memory: Optional[float] = None, finetune: str = "full",
         lora_rank: int = 8, lora_targets: Sequence[str] = ("all",), rollout_rows: int = 0,
         reference: bool = False, parallel: Optional[ParallelConfig] = None) -> Dict[str, Any]:
    """Estimate the memory and time of one training step (of one rank with `parallel`).

    Args:
        args (ModelArgs): the model.
        settings (Optional[PlanSettings]): sequence length, batch, optimizer, precision, checkpointing, ...
            (`micro_batch_size` per data-parallel rank, as `verse train` reads it).
        gpu (str): a key of `GPUS` (its memory, peak FLOP/s and bandwidths), or "cpu" with `device_memory`.
        mfu (float): model FLOPs utilisation assumed for the time estimate.
        device_memory (Optional[float]): bytes available, overriding the GPU's.
        finetune (str): full | lora (frozen base in `param_dtype`) | qlora (frozen base matmul weights in NF4 at
            `NF4_BYTES_PER_PARAM`, the rest bf16); with adapters only they get gradients and optimizer state,
            and each NF4 weight is dequantized to bf16 one matmul at a time.
        lora_rank (int): adapter rank.
        lora_targets (Sequence[str]): adapted groups or leaf names (`verse.peft.lora.GROUPS`).
        rollout_rows (int): GRPO (mode=grpo): completions generated together (prompts_per_step x group_size);
            their KV cache (`seq_len` positions each) and one step of fp32 logits live during the rollout, next
            to the weights and optimizer state; 0 = not GRPO. With `parallel` each data-parallel rank generates
            its share, from the policy FSDP2 gathers whole for the rollout (`verse.train.parallelize.gathered`).
        reference (bool): GRPO with beta > 0 and a full fine-tune: a frozen copy of the weights, sharded like the
            policy with `parallel` (with LoRA the reference is the base with adapters off: nothing more).
        parallel (Optional[ParallelConfig]): a resolved layout (`torchrun` ranks; LoRA/QLoRA and GRPO: dp_shard and
            dp_replicate only, base and adapters sharded over dp_shard): every byte is then one rank's (see
            `_sharding`), and the time adds communication (see `_comm_time`).

    Returns:
        Dict[str, Any]: params, active_params, weights_bytes, grads_bytes, optimizer_bytes, activations_bytes,
        logits_bytes, temp_bytes, peak_bytes, device_bytes, fits, step_time_s, tokens_per_s, settings; with
        GRPO also reference_bytes and generation_bytes; with `parallel` also gpus, parallel, gathered_bytes,
        compute_time_s, comm_time_s.
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
    if parallel is not None and rollout_rows:
        dp = parallel.dp_replicate * parallel.dp_shard
        if parallel.tp > 1 or parallel.ep > 1 or rollout_rows % dp:
            raise ConfigError(f"mode=grpo samples whole groups on data-parallel ranks (as `verse train` does): use "
                              f"dp_shard / dp_replicate (tp=1, ep=1) dividing prompts_per_step, not {parallel.degrees}")
    if parallel is not None and finetune != "full" and (parallel.tp > 1 or parallel.ep > 1):
        raise ConfigError(f"finetune {finetune} shards its adapters over data-parallel ranks only (as `verse train` "
                          f"does): use dp_shard / dp_replicate with tp=1 and ep=1, not {parallel.degrees}")
    tp = parallel.tp if parallel is not None else 1
    sharding = _sharding(args, parallel) if parallel is not None else None
    # FSDP2 with fp32 parameters and bf16 compute all-gathers bf16 copies: autocast caches none of its own
    fsdp_mp = sharding is not None and sharding["fsdp"] and s.precision == "bf16" and not low
    frozen, dequant_temp, frozen_bytes = 0.0, 0, pbytes
    # LoRA / QLoRA under FSDP2: the frozen base and the adapters are both sharded over the dp_shard ranks
    shards = parallel.dp_shard if sharding is not None and sharding["fsdp"] else 1
    if finetune != "full":
        adapter, adapted = _lora_params(args, lora_rank, lora_targets)
        if finetune == "qlora":
            from verse.peft.qlora import NF4_BYTES_PER_PARAM

            layer_matmuls = _layer_matmul_params(args)
            frozen = layer_matmuls * NF4_BYTES_PER_PARAM + (params - layer_matmuls) * 2
            frozen_bytes = NF4_BYTES_PER_PARAM  # a block is all-gathered as NF4 (its norms are noise)
            dequant_temp = 2 * 2 * _largest_matmul(args)  # one weight dequantized to bf16 (forward or backward)
        else:
            frozen = params * pbytes
        frozen /= shards
        params_trained = math.ceil(adapter / shards)
        shapes = [params_trained]
    elif sharding is not None:
        shapes = sharding["rank_shapes"]
        params_trained = sum(shapes)
    else:
        params_trained = params
    weights = frozen + params_trained * pbytes + (4 * params_trained if master else 0)
    matmul_params = params - args.vocab_size * args.dim - (2 * args.n_layers + 1) * args.dim  # all but embed, norms
    # autocast caches bf16 copies of fp32 weights that require grad (frozen base weights are cast per use); fp8 casts
    # the blocks' Linear weights to float8 per use instead (`verse.train.fp8`), so only the others get copies
    cast = matmul_params - (_layer_matmul_params(args) if s.precision == "fp8" else 0)
    autocast_copies = (2 * (cast // tp if finetune == "full" else params_trained)
                       if (s.precision in ("bf16", "fp8") and not low and not fsdp_mp) else 0)
    grad_bytes = 4 if master else pbytes
    largest = max(shapes)
    grads = (largest * (grad_bytes + (4 if master else 0)) if s.fused_backward
             else params_trained * grad_bytes)
    params = params_trained
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
    math_kernel, padded = _math_attention(args, gpu), _padded_values(args, gpu)
    layer_full = [round(_layer_bytes_per_token(args, i, act, tp, math_kernel, padded) * tokens)
                  for i in range(args.n_layers)]
    resid = 4 if act.param_dtype == "float32" else 2  # the residual stream's dtype
    k = s.activation_checkpointing
    checkpointed = [k > 0 and i % k == 0 for i in range(args.n_layers)]
    # with tp the residual stream between blocks is split by sequence (tokens / tp rows on each rank)
    activations = sum(resid * args.dim * tokens // tp if ck else full for ck, full in zip(checkpointed, layer_full))
    # ids, the final norm's fp32 input, its normalized tensor (in the residual dtype) and rstd
    activations += tokens * (8 + (4 + resid) * args.dim + 4)
    activations += 2 * 4 * args.rope_dim * s.seq_len  # this forward's fp32 RoPE cos and sin, one row per position
    recompute = max((full for ck, full in zip(checkpointed, layer_full) if ck), default=0)
    chunk = min(s.loss_chunk_size, tokens)
    # one chunk at its backward: the saved fp32 log-softmax, its incoming gradient and the gradient it returns, 4
    # bytes each (bf16 logits are freed once copied to fp32, before any of these exist; #15), and the chunk's hidden
    # (gathered whole by the final norm). Tensor parallelism leaves the logits split by vocabulary (each rank holds
    # vocab_size / tp columns), and `loss.VocabParallelCrossEntropy` saves the fp32 logits themselves to recompute
    # the log-softmax in backward: one copy more
    logits = chunk * args.vocab_size // tp * (4 if tp > 1 else 3) * 4 + tokens * args.dim * c
    # the gradients between layers (of the sequence part with tp) and the recomputed layer
    temp = 2 * tokens * args.dim * 4 // tp + recompute + dequant_temp
    head_grad = args.vocab_size * args.dim // tp * grad_bytes if finetune == "full" else 0
    gathered = 0
    if sharding is not None and sharding["fsdp"]:
        # FSDP2 keeps the root (embedding, norm, head) and the last block unsharded from forward into backward, and
        # the head's gradient (unsharded, in the gathered dtype) lives until the root's reduce-scatter at the end;
        # later in backward one block is prefetched while another runs, whose unsharded gradients wait for their
        # reduce-scatter (an fp32 copy when computed in bf16)
        gather_bytes = 2 if fsdp_mp else pbytes
        blocks = sharding["block_full"]
        if finetune == "full":
            gathered = gather_bytes * (sharding["root_full"] + blocks[-1])
            temp += max(blocks) * (2 * gather_bytes + (4 if fsdp_mp else 0))
            head_grad = args.vocab_size * args.dim // tp * gather_bytes
        else:  # a frozen base: gathered blocks only, no unsharded base gradients (the adapters' are noise)
            root_bytes = 2 if finetune == "qlora" else gather_bytes
            block_bytes = frozen_bytes if finetune == "qlora" else gather_bytes
            gathered = root_bytes * sharding["root_full"] + block_bytes * blocks[-1]
            temp += max(blocks) * block_bytes
    persistent_grads = grads if s.gradient_accumulation_steps > 1 and not s.fused_backward else 0
    # the loss chunks run first in backward and are freed before any layer is recomputed
    backward_peak = (weights + autocast_copies + optimizer + activations + gathered + max(logits, temp)
                     + max(head_grad, persistent_grads))
    step_peak = weights + optimizer + grads + optimizer_temp
    reference_bytes = count_params(args) * pbytes / shards if reference and finetune == "full" else 0
    generation = 0
    if rollout_rows:
        from verse.model.mla import generation_bytes_per_row

        cache_dtype = torch_dtype("bfloat16" if finetune == "qlora" else s.param_dtype)
        if sharding is not None and sharding["fsdp"]:
            # the policy gathered whole for the rollout, in FSDP2's compute dtype (the NF4 base as NF4), next to
            # this rank's shards; each data-parallel rank samples its share of the rows
            rollout_rows //= parallel.dp_replicate * parallel.dp_shard
            if fsdp_mp:
                cache_dtype = torch.bfloat16
            gather_bytes = 2 if fsdp_mp else pbytes
            generation = frozen * shards if finetune == "qlora" else count_params(args) * gather_bytes
            generation += params_trained * shards * gather_bytes if finetune != "full" else 0  # the adapters
        elif finetune != "qlora" and cache_dtype == torch.float32 and _compute_bytes(s) == 2:
            # an fp32 policy under bf16 autocast samples from a bf16 copy of itself (`rl.rollout.generation_copy`)
            cache_dtype = torch.bfloat16
            generation = count_params(args) * 2
        generation += rollout_rows * generation_bytes_per_row(args, s.seq_len, cache_dtype)
    peak = max(backward_peak, step_peak, weights + optimizer + generation) + reference_bytes

    flops = flops_per_token(args, s.seq_len) * (1 + (1 / 3 if k else 0) / max(k, 1))  # recompute = +1 forward
    step_tokens = tokens * s.gradient_accumulation_steps
    compute_time = step_tokens * flops / (tp * spec["flops"] * mfu) if spec["flops"] else None
    comm_time = (_comm_time(args, s, parallel, sharding, spec, compute_time, fsdp_mp)
                 if sharding is not None and compute_time is not None else 0.0)
    step_time = compute_time + comm_time if compute_time is not None else None
    n_gpus = 1 if parallel is None else math.prod(parallel.degrees.values())
    global_tokens = step_tokens * n_gpus // tp
    return {
        "params": count_params(args), "active_params": count_params(args, active=True),
        "finetune": finetune, "trainable_params": params if finetune != "full" else count_params(args),
        **({"lora_rank": lora_rank, "lora_targets": list(lora_targets)} if finetune != "full" else {}),
        "weights_bytes": weights + autocast_copies, "grads_bytes": grads, "optimizer_bytes": optimizer,
        "activations_bytes": activations, "logits_bytes": logits, "temp_bytes": temp + optimizer_temp,
        "peak_bytes": peak, "device_bytes": device_bytes, "fits": bool(device_bytes and peak <= device_bytes),
        **({"reference_bytes": reference_bytes, "generation_bytes": generation} if rollout_rows else {}),
        **({"gpus": n_gpus, "parallel": parallel.degrees, "gathered_bytes": gathered,
            "compute_time_s": compute_time, "comm_time_s": comm_time} if parallel is not None else {}),
        "gpu": gpu, "mfu": mfu, "step_time_s": step_time,
        "tokens_per_s": global_tokens / step_time if step_time else None,
        "settings": dataclasses.asdict(s),
    }


def layout_problems(args: ModelArgs, parallel: ParallelConfig) -> List[str]:
    """Why `parallel` cannot lay out `args` (empty when it can): tensor parallelism must divide the head counts,
    the vocabulary and the MLP width (as `apply_tp` requires), expert parallelism the routed experts."""
    problems = []
    if parallel.tp > 1:
        widths = {"n_heads": args.n_heads, "vocab_size": args.vocab_size, "inter_dim": args.inter_dim,
                  **({"n_kv_heads": args.n_kv_heads} if args.attention != "mla" else {})}
        problems += [f"tp={parallel.tp} does not divide {name}={value}" for name, value in widths.items()
                     if value % parallel.tp]
    if parallel.ep > 1 and not args.is_moe:
        problems.append(f"ep={parallel.ep} needs an MoE model (this one is dense)")
    elif parallel.ep > 1 and args.n_routed_experts % parallel.ep:
        problems.append(f"ep={parallel.ep} does not divide n_routed_experts={args.n_routed_experts}")
    return problems


def search_layouts(args: ModelArgs, settings: PlanSettings, gpu: str, gpus: int, **kwargs: Any
                   ) -> List[Dict[str, Any]]:
    """Plan every layout of `gpus` ranks the model allows, least model parallelism first.

    Order: tp x ep (ranks that split one copy of the model's compute), then tp, then dp_shard (fewer shards: more
    replicas, less gathering); tp stays inside a node (`GPUS_PER_NODE`).

    Args:
        args (ModelArgs): the model.
        settings (PlanSettings): the step (`micro_batch_size` per data-parallel rank).
        gpu (str): a key of `GPUS`.
        gpus (int): number of ranks.
        **kwargs: more `plan` arguments (mfu, device_memory).

    Returns:
        List[Dict[str, Any]]: one `plan` result per layout, in that order; the first that fits is the answer.
    """
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    layouts = []
    for tp in (d for d in divisors if d <= GPUS_PER_NODE):
        for ep in (d for d in divisors if (gpus // tp) % d == 0):
            for shard in (d for d in divisors if (gpus // (tp * ep)) % d == 0):
                layout = ParallelConfig(dp_replicate=gpus // (tp * ep * shard), dp_shard=shard, tp=tp, ep=ep)
                # adapters and GRPO's rollouts: data-parallel ranks only
                dp_only = kwargs.get("finetune", "full") != "full" or kwargs.get("rollout_rows", 0) > 0
                rows = kwargs.get("rollout_rows", 0) % (layout.dp_replicate * layout.dp_shard)
                if not layout_problems(args, layout) and not (dp_only and tp * ep > 1) and not rows:
                    layouts.append(layout)
    layouts.sort(key=lambda p: (p.tp * p.ep, p.tp, p.dp_shard))
    return [plan(args, settings, gpu, parallel=layout, **kwargs) for layout in layouts]


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
    """The cheapest combinations of `MOVES` (fewest moves first) that make the run fit, with their peak and their
    `PlanSettings` changes (`finetune`: `plan`'s finetune, lora_rank, lora_targets, parallel)."""
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
                found.append({"moves": [m for m, _ in combo], "peak_bytes": result["peak_bytes"], "changes": changes})
            if len(found) >= limit:
                return found
    seq = settings.seq_len
    while seq > 128 and len(found) < limit:
        seq //= 2
        result = plan(args, dataclasses.replace(settings, seq_len=seq), gpu, device_memory=device_memory,
                      **finetune)
        if result["fits"]:
            found.append({"moves": [f"max_seq_len={seq}"], "peak_bytes": result["peak_bytes"],
                          "changes": {"seq_len": seq}})
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


def layout_name(degrees: Dict[str, int]) -> str:
    """`dp_shard=8 tp=1 ...` as `--parallel` spells it (dimensions of size 1 left out, dp_shard always shown)."""
    shown = [f"{k}={v}" for k, v in degrees.items() if v > 1 or k == "dp_shard"]
    return ",".join(shown)


def format_layouts(results: List[Dict[str, Any]], limit: int = 12) -> str:
    """The table of `search_layouts` candidates (what `verse plan --gpus N` prints before the chosen plan):
    fully sharded layouts (dp_replicate=1) and the first that fits, at most `limit` rows."""
    chosen = next((r for r in results if r["fits"]), None)
    rows = [r for r in results if r["parallel"]["dp_replicate"] == 1 or r is chosen]
    if chosen is not None and rows.index(chosen) >= limit:  # the answer always shows
        rows = rows[:limit - 1] + [chosen]
    lines = [f"{'layout':<30}{'peak/rank':>12}{'s/step':>9}{'tokens/s':>12}"]
    for r in rows[:limit]:
        mark = "  <- smallest that fits" if r is chosen else ("" if r["fits"] else "  does not fit")
        time = (f"{r['step_time_s']:>9.2f}{r['tokens_per_s']:>12,.0f}" if r["step_time_s"] else f"{'':>21}")
        lines.append(f"{layout_name(r['parallel']):<30}{format_bytes(r['peak_bytes']):>12}{time}{mark}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layouts (--json lists every one)")
    return "\n".join(lines)


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
    if "parallel" in result:
        lines.append(f"layout: {result['gpus']} x {result['gpu']}, {layout_name(result['parallel'])}; memory per rank "
                     f"(FSDP2 shards over dp_shard x ep, tp splits heads/MLP/vocabulary, ep the routed experts)")
    keys = ["weights", "grads", "optimizer", "activations", "logits", "temp"]
    if "parallel" in result:  # FSDP2's unsharded root, last block and the running + prefetched block
        keys.append("gathered")
    if "generation_bytes" in result:  # GRPO: the frozen reference and the rollout's KV cache
        keys += ["reference", "generation"]
    for key in keys:
        lines.append(f"  {key + ':':<13}{format_bytes(result[key + '_bytes']):>12}")
    lines.append(f"  {'peak:':<13}{format_bytes(result['peak_bytes']):>12}   of {format_bytes(result['device_bytes'])}"
                 f" usable on {result['gpu']} -> {'FITS' if result['fits'] else 'DOES NOT FIT'}")
    if result["step_time_s"]:
        lines.append(f"time: {result['step_time_s']:.2f} s/step, {result['tokens_per_s']:,.0f} tokens/s at "
                     f"{result['mfu']:.0%} MFU" + (f" (compute {result['compute_time_s']:.2f} s + communication "
                                                   f"{result['comm_time_s']:.2f} s not hidden by it)"
                                                   if "parallel" in result else ""))
    if not result["fits"]:
        lines.append("cheapest changes that fit:" if moves else "no combination of the usual moves fits")
        lines += [f"  {' '.join(m['moves'])}  -> peak {format_bytes(m['peak_bytes'])}"
                  + (f" on {layout_name(m['parallel'])}" if "parallel" in m else "") for m in moves]
    return "\n".join(lines)
