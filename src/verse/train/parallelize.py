"""Parallelism applied to a `ReasoningLLM` from outside, after it is built on the meta device (in the spirit of
torchtitan's `parallelize_llama`): tensor parallelism with DTensor `parallelize_module` (Megatron-LM column/row
splits), expert parallelism (MoE experts split over ranks, all-to-all token dispatch), then FSDP2 `fully_shard` per
block and on the root (HSDP over `dp_replicate`), then `to_empty` and an initialisation that gives every rank
exactly its shard of what one process would have drawn. No rank ever holds the full model: at most one module's full
parameters exist at a time. The cross-rank parts of training and the activation checkpointing the model itself knows
nothing of live here too (`update_router_bias`, `apply_ac`).
"""

import contextlib
from typing import Iterator

import torch
import torch.distributed as tdist  # `dist` names the job (Dist) here
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn

from verse.errors import ConfigError
from verse.model import ReasoningLLM
from verse.model.moe import MoE
from verse.train.distributed import Dist


def dp_mesh(dist: Dist):
    """The data-parallel mesh FSDP2 shards over: `dp_shard_ep` (HSDP: `dp_replicate x dp_shard_ep`)."""
    if dist.parallel.dp_replicate > 1:
        return dist.mesh["dp_replicate", "dp_shard_ep"]
    return dist.mesh["dp_shard_ep"]


def apply_tp(model: ReasoningLLM, dist: Dist) -> None:
    """Split the model over the `tp` mesh dimension (Megatron-LM, arXiv:1909.08053) with sequence parallelism
    (Korthikanti et al., arXiv:2205.05198) and a vocabulary-parallel loss, as torchtitan lays out Llama.

    Attention heads and the MLP hidden width are split column-wise (query/key/value, gate/up) and their output
    projections row-wise; between them the residual stream is split by sequence (each tp rank holds [B, T/tp, dim]:
    the norms run on their part, `SequenceParallel`), all-gathered before attention and the FFN and
    reduce-scattered after them. The embedding is split by vocabulary rows (reduce-scattered into sequence parts);
    the final norm runs on the gathered sequence and the output head is split by vocabulary columns, its logits left
    split for `verse.train.loss.VocabParallelCrossEntropy` (no rank holds a full row of logits). MLA's latent
    down-projection and MoE layers are computed whole on every tp rank.

    Args:
        model (ReasoningLLM): the model on the meta device (before `apply_fsdp`).
        dist (Dist): the job (`parallel.tp` > 1).

    Raises:
        ConfigError: head counts or widths that tp does not divide, or MLA's absorbed attention.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    from verse.model.attention import Attention
    from verse.model.ffn import MLP
    from verse.model.mla import MLA

    tp, args = dist.parallel.tp, model.args
    widths = {"n_heads": args.n_heads, "vocab_size": args.vocab_size, "inter_dim": args.inter_dim}
    if args.attention != "mla":
        widths["n_kv_heads"] = args.n_kv_heads
    bad = [f"{name}={value}" for name, value in widths.items() if value % tp]
    if bad:
        raise ConfigError(f"parallel.tp={tp} must divide {', '.join(bad)}: choose a tp that divides them")
    if args.attention == "mla" and args.attn_impl != "naive":
        raise ConfigError(f"parallel.tp={tp} splits MLA's heads in attn_impl=naive (training's); got "
                          f"attn_impl={args.attn_impl}")
    mesh = dist.mesh["tp"]

    def gather(*rest: None, back: bool = False):
        """The sequence part (first input) gathered whole for a module (plain tensors inside it); `back`: its
        whole output cut back to this rank's part."""
        inputs = {"input_layouts": (Shard(1), *rest), "desired_input_layouts": (Replicate(), *rest)}
        if back:
            return PrepareModuleInputOutput(**inputs, use_local_input=True, output_layouts=Replicate(),
                                            desired_output_layouts=Shard(1))
        return PrepareModuleInput(**inputs, use_local_output=True)

    parallelize_module(model, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": gather(),
        "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    })
    if args.tie_embeddings:  # both split by vocabulary rows (Shard(0)): one parameter again, as before the split
        model.head.weight = model.embed.weight
    model.embed.register_forward_pre_hook(lambda m, inputs: _check_sequence_split(inputs[0], tp))
    for block in model.layers:
        # Block calls attn(x, cos, sin, mask, input_pos), an MoE ffn(x, aux_loss_scale), an MLP ffn(x)
        plan = {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(), "attn": gather(None, None, None, None),
                "attn.wo": RowwiseParallel(output_layouts=Shard(1))}
        if isinstance(block.attn, Attention):
            plan.update({f"attn.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
        elif isinstance(block.attn, MLA):
            plan.update({f"attn.{n}": ColwiseParallel() for n in ("wq", "wq_b", "wkv_b") if hasattr(block.attn, n)})
            rope = args.qk_rope_head_dim
            block.attn.wkv_a.register_forward_hook(lambda m, i, out, rope=rope: _sum_rope_key_grad(out, rope, mesh))
        if isinstance(block.ffn, MLP):
            plan.update({"ffn": gather(), "ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(),
                         "ffn.w2": RowwiseParallel(output_layouts=Shard(1))})
        else:  # MoE: computed whole on every tp rank
            plan["ffn"] = gather(None, back=True)
        parallelize_module(block, mesh, plan)


def _check_sequence_split(input_ids: torch.Tensor, tp: int) -> None:
    """Sequence parallelism cuts every sequence into tp equal parts: refuse, in one line, a length tp does not
    divide (before any collective, on every tp rank alike: they read the same batch)."""
    if input_ids.size(-1) % tp:
        raise ConfigError(f"parallel.tp={tp} splits each sequence into {tp} equal parts, but a batch has length "
                          f"{input_ids.size(-1)}: make max_seq_len and data.pad_to_multiple_of multiples of {tp}")


def _sum_rope_key_grad(out: torch.Tensor, rope: int, mesh) -> torch.Tensor:
    """MLA's RoPE key (the last `rope` columns of `wkv_a`'s output) is shared by all heads, of which each tp rank
    holds a part: its gradient is summed over the tp ranks (identity forward; DTensor turns the Partial gradient
    into a Replicate one with an all-reduce). The latent part needs nothing: `wkv_b`'s column split does it."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    latent, key = out.split([out.size(-1) - rope, rope], dim=-1)
    key = DTensor.from_local(key, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    return torch.cat((latent, key), dim=-1)


def apply_ep(model: ReasoningLLM, dist: Dist) -> None:
    """Split every MoE layer's routed experts over the `ep` mesh dimension (GShard, arXiv:2006.16668; DeepSeek-V3):
    ep rank r holds experts [r * E/ep, (r+1) * E/ep) as a `Shard(0)` DTensor. Routing, shared experts and the
    balance statistics stay where they are (every rank routes its own tokens, so loads, the bias update and the
    aux loss see exactly what they see without ep); `ExpertDispatch` sends each routed token to the rank holding
    its expert and brings the result back, around the `Experts` module (one all-to-all each way).

    Args:
        model (ReasoningLLM): the model on the meta device (before `apply_fsdp`).
        dist (Dist): the job (`parallel.ep` > 1).

    Raises:
        ConfigError: a model without MoE layers, or an ep that does not divide `n_routed_experts`.
    """
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    ep, layers = dist.parallel.ep, model.moe_layers
    if not layers:
        raise ConfigError(f"parallel.ep={ep} splits MoE experts, but this model has no MoE layer: use ep=1 "
                          "(and dp_shard for its weights)")
    if model.args.n_routed_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide n_routed_experts={model.args.n_routed_experts}: choose "
                          "an ep that divides it")
    mesh = dist.mesh["ep"]

    def split(name: str, module: nn.Module, mesh) -> None:
        for key, p in list(module.named_parameters(recurse=False)):  # no communication: each rank cuts its block
            module.register_parameter(key, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None),
                                                        requires_grad=p.requires_grad))

    for moe in layers.values():
        dispatch = ExpertDispatch(mesh)
        distribute_module(moe.experts, mesh, split, input_fn=dispatch.dispatch, output_fn=dispatch.combine)


class ExpertDispatch:
    """All-to-all token exchange around one MoE layer's expert-parallel `Experts` (the seam `MoE.forward` calls
    with rows sorted by global expert id and the rows per expert).

    Rows for the experts of ep rank j are contiguous (experts are sorted, rank j holds a contiguous block), so one
    `all_to_all_single` with per-rank split sizes sends them; the counts go first so that each rank knows what it
    receives. Received rows come grouped by source rank, then by local expert: a stable sort regroups them by
    local expert for the `Experts` forward, and the inverse permutation and the reverse all-to-all return every
    result to the rank and position its token came from. Both exchanges are differentiable (the backward is the
    opposite all-to-all).

    Args:
        mesh (DeviceMesh): the one-dimensional `ep` mesh.
    """

    def __init__(self, mesh):
        self.group, self.ep = mesh.get_group(), mesh.size()
        self.state: tuple = ()  # (inverse permutation, rows sent per rank, rows received per rank) of this forward

    def dispatch(self, module: nn.Module, inputs: tuple, mesh) -> tuple:
        """`(x, counts)` for all experts -> `(x, counts)` for this rank's experts, from every rank's tokens."""
        x, counts = inputs
        local = counts.numel() // self.ep
        received = torch.empty_like(counts)  # [source rank, my local expert]
        tdist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, local)
        send, recv = counts.view(self.ep, local).sum(1).tolist(), received.sum(1).tolist()
        x = all_to_all_single_autograd(x, recv, send, self.group)
        expert = torch.arange(local, device=x.device).repeat(self.ep).repeat_interleave(received.flatten(),
                                                                                      output_size=sum(recv))
        order = expert.argsort(stable=True)
        self.state = (order.argsort(), send, recv)
        return x[order], received.sum(0)

    def combine(self, module: nn.Module, y: torch.Tensor, mesh) -> torch.Tensor:
        """This rank's expert outputs -> the outputs of this rank's own rows, in the order `dispatch` got them."""
        inverse, send, recv = self.state
        return all_to_all_single_autograd(y[inverse], send, recv, self.group)


def apply_fsdp(model: ReasoningLLM, dist: Dist, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """Shard `model` with FSDP2: one `fully_shard` per block, then the root (embedding, final norm, head).

    Gradients are summed, not averaged, over ranks: the trainer divides the loss by the loss tokens of the whole
    global batch, so the sum is the gradient one process would compute on that batch.

    Args:
        model (ReasoningLLM): the model (usually still on the meta device).
        dist (Dist): the job.
        param_dtype (torch.dtype | None): compute dtype of the all-gathered parameters (bf16 mixed precision);
            None keeps the stored dtype.
        reduce_dtype (torch.dtype): dtype of the gradient reduce-scatter (fp32).
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    mesh = dp_mesh(dist)
    # tensor/expert parallelism alone: nothing to shard over data-parallel ranks (a job of one rank is still
    # wrapped: the GPU check runs the FSDP2 path on one GPU)
    if mesh.size() == 1 and dist.world_size > 1:
        return
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    # a CPU job's shards are in CPU memory already (and pinning needs an accelerator): nothing to offload
    offload = CPUOffloadPolicy() if dist.parallel.cpu_offload and dist.device.type != "cpu" else OffloadPolicy()
    # the MoE routing bias is moved by a rule, not by gradient, from loads summed over all ranks: every rank keeps
    # the whole (tiny) vector and applies the same update
    # (LoRA's frozen base weights, also requires_grad=False, are sharded: FSDP2 groups mix frozen and trained ones)
    ignored = {moe.gate.bias for moe in model.moe_layers.values() if moe.gate.bias is not None}
    # expert-parallel experts are split over `ep` already: FSDP2 shards them over the other data ranks only
    expert_mesh = dist.mesh["dp_replicate", "dp_shard"] if dist.parallel.dp_replicate > 1 else dist.mesh["dp_shard"]
    for i, block in enumerate(model.layers):
        keep = _reshards_after_forward(i, len(model.layers))
        if dist.parallel.ep > 1 and isinstance(block.ffn, MoE):
            fully_shard(block.ffn.experts, mesh=expert_mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=keep)
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored,
                    reshard_after_forward=keep)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    # the trainer calls hidden_states (the chunked loss applies the head itself): run FSDP's hooks on it too
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def _reshards_after_forward(block: int, n_blocks: int) -> bool:
    """Whether FSDP2 frees block `block`'s gathered parameters after its forward: all but the last, whose parameters
    backward needs again at once."""
    return block < n_blocks - 1


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 module of `model` all-gathered once and kept whole for the forwards run inside, then resharded.

    Generation (GRPO's rollouts, held-out evaluation) runs many small forwards whose number differs between ranks
    (each stops when its own rows end): inside, a forward runs no collective at all, so ranks decode independently.
    The gathered parameters are in FSDP2's compute dtype (`MixedPrecisionPolicy.param_dtype`: bf16 for an fp32 model
    trained in bf16, the dtype one process samples in, `verse.rl.rollout.generation_copy`). A model that is not
    sharded is left alone. Every rank must enter together (the all-gathers are collectives).

    Args:
        model (nn.Module): a `ReasoningLLM` sharded by `apply_fsdp` (or a plain one).
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        # back to `apply_fsdp`'s choice: a block's (and its experts') by its place; the root keeps its parameters
        n = len(model.layers)
        block_of = {id(m): i for i, block in enumerate(model.layers) for m in block.modules()}
        for module in sharded:
            i = block_of.get(id(module))
            module.set_reshard_after_forward(i is not None and _reshards_after_forward(i, n), recurse=False)
            module.reshard()


@contextlib.contextmanager
def _full_params(module: nn.Module) -> Iterator[None]:
    """Swap `module`'s own DTensor parameters for full-size plain tensors, then copy each rank's part back."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped = {}
    for name, p in module.named_parameters(recurse=False):
        if isinstance(p, DTensor):
            swapped[name] = p
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device),
                                               requires_grad=p.requires_grad))
    try:
        yield
    finally:
        for name, p in swapped.items():
            full = getattr(module, name).data
            # src_data_rank=None: no communication, every rank cuts its own part of the identical full tensor
            part = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(part.to_local())
            setattr(module, name, p)


@torch.no_grad()
def init_sharded(model: ReasoningLLM, device: torch.device, seed: int) -> None:
    """Materialise a sharded meta-device model on `device` and initialise it exactly as one process would.

    The RNG is consumed module by module in `ReasoningLLM.init_weights` order, each module's parameters drawn
    full-size and then cut to this rank's shard: every rank gets the same values as `ReasoningLLM(args)` after
    `torch.manual_seed(seed)`, never holding more than one module's full weights.

    Args:
        model (ReasoningLLM): sharded (`apply_fsdp`), on the meta device.
        device (torch.device): this rank's device.
        seed (int): the run seed (the same on every rank).
    """
    model.to_empty(device=device)
    model.reset_buffers()
    torch.manual_seed(seed)
    for name, module in model.named_modules():
        with _full_params(module):
            model.init_module(name, module)


@torch.no_grad()
def update_router_bias(model: nn.Module) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing after an optimizer step: sum every MoE layer's expert load over the
    ranks (one all-reduce for all layers), then let the model move its router biases with those loads, the same
    on every rank.

    A no-op for a dense model or when no layer balances by bias; on one process the loads are the layers' own.

    Args:
        model (nn.Module): a `ReasoningLLM` (anything with `moe_layers` and `update_router_bias(loads)`).
    """
    layers = {i: moe for i, moe in getattr(model, "moe_layers", {}).items() if moe.balances_by_bias}
    if not layers:
        return
    loads = {i: moe.bias_load for i, moe in layers.items()}
    if tdist.is_available() and tdist.is_initialized():
        stacked = torch.stack(list(loads.values()))
        tdist.all_reduce(stacked)
        loads = dict(zip(loads, stacked.unbind(0)))
    model.update_router_bias(loads)


def parallelize(model: ReasoningLLM, dist: Dist, *, param_dtype: torch.dtype | None = None) -> None:
    """Apply the job's layout to a meta-device model: tensor parallelism (`tp`), then FSDP2 over the data ranks.

    Args:
        model (ReasoningLLM): the model on the meta device.
        dist (Dist): the job.
        param_dtype (torch.dtype | None): FSDP2 compute dtype (see `apply_fsdp`).
    """
    if dist.parallel.tp > 1:
        apply_tp(model, dist)
    if dist.parallel.ep > 1:
        apply_ep(model, dist)
    apply_fsdp(model, dist, param_dtype=param_dtype)


def apply_ac(model: nn.Module, every: int = 1) -> nn.Module:
    """Activation checkpointing applied from outside (torchtitan's `apply_ac`): every `every`-th block (0, k, 2k,
    ...) keeps only its input in the forward and recomputes the rest in the backward (non-reentrant).

    Uses `torch.distributed._composable.checkpoint`, which hooks the blocks instead of wrapping them: parameter and
    state-dict names stay as they are (checkpoints and Hugging Face export see no wrapper prefix), and FSDP2's
    `fully_shard` composes with it. Blocks already checkpointed are left as they are.

    Args:
        model (nn.Module): a `ReasoningLLM` (anything with `layers`).
        every (int): checkpoint every k-th block (1 = all).

    Returns:
        nn.Module: `model`, changed in place.
    """
    from torch.distributed._composable import checkpoint

    if every < 1:
        raise ValueError(f"apply_ac: every must be >= 1, got {every}")
    for i, block in enumerate(model.layers):
        if i % every == 0 and checkpoint.state(block) is None:
            checkpoint(block)
    return model
