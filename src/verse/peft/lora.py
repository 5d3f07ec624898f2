"""LoRA (Hu et al., arXiv:2106.09685), rsLoRA (arXiv:2312.03732) and DoRA (Liu et al., arXiv:2402.09353),
applied to a Verse model from outside.

`apply_lora(model, args)` swaps each targeted `verse.model.linear.Linear` for a `LoraLinear` that shares its (frozen)
weight and adds y += scaling * B(A(dropout(x))), with PEFT's initialisation (A kaiming-uniform with a=sqrt(5), B
zeros) and scaling alpha / rank (alpha / sqrt(rank) with rsLoRA). With DoRA a magnitude vector m, initialised to the
row norms of W, rescales the adapted weight: W' = m / ||W + s B A||_row * (W + s B A), the norm detached (DoRA 4.3),
computed as PEFT's `DoraLinearLayer` does. MoE experts (`verse.model.moe.Experts`, stacked weights) become
`LoraExperts`: one A/B pair per expert and projection, stacked and run as grouped GEMMs like the base weights.

The model itself knows nothing of adapters; the base weights never receive gradients.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from verse.errors import ConfigError
from verse.model.linear import Linear
from verse.model.moe import Experts

# Verse module leaf names by target group (MLA: wq or wq_a/wq_b, wkv_a, wkv_b; MLP: dense, shared and routed experts)
ATTENTION = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wkv_b")
MLP = ("w1", "w2", "w3", "experts")
GROUPS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP, "all-linear": ATTENTION + MLP}


@dataclass(frozen=True)
class LoraArgs:
    """What `apply_lora` adds to a model.

    Attributes:
        rank (int): r, the inner width of each adapter.
        alpha (float): scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with `rslora`).
        dropout (float): dropout on the input of the adapter path while training.
        targets (Tuple[str, ...]): groups (`attention`, `mlp`, `all`) and/or module leaf names, in Verse (`wq`,
            `w1`, `experts`) or Hugging Face spelling (`q_proj`, `gate_proj`, `kv_b_proj`).
        dora (bool): weight-decomposed LoRA (a trained magnitude per output row).
        rslora (bool): rank-stabilised scaling alpha / sqrt(r).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = field(default=("all",))
    dora: bool = False
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _init_lora_A(a: torch.Tensor) -> None:
    """PEFT's default: kaiming-uniform with a=sqrt(5) (nn.Linear's own init), per expert for stacked adapters."""
    for matrix in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


def _adapter_dtype(weight: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Adapters live in `dtype`, else the base weight's float dtype (float32 for FP8/GGUF storage)."""
    if dtype is not None:
        return dtype
    return weight.dtype if weight.dtype.is_floating_point and weight.element_size() > 1 else torch.float32


class LoraLinear(Linear):
    """A `Linear` plus a low-rank update (and optionally DoRA's magnitude); the base weight is shared and frozen.

    Parameters: `weight` (and `scale`, `bias`) of the base layer, `lora_A` [r, in], `lora_B` [out, r] and, with
    DoRA, `lora_magnitude` [out].

    Args:
        base (Linear): the layer to adapt.
        args (LoraArgs): rank, alpha, dropout, dora, rslora.
        dtype (Optional[torch.dtype]): adapter dtype (default: the base weight's float dtype).
    """

    def __init__(self, base: Linear, args: LoraArgs, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias, self.scale = base.weight, base.bias, base.scale
        self.ggml_type = base.ggml_type
        self.register_buffer("int8_scale", base.int8_scale, persistent=False)  # an int8 base (Linear.int8_)
        self.gemm_impl, self.block_size = base.gemm_impl, base.block_size  # the base layer's own GEMM settings
        self.init_scale = base.init_scale
        for p in base.parameters(recurse=False):
            p.requires_grad_(False)
        kind = dict(dtype=_adapter_dtype(base.weight, dtype), device=base.weight.device)
        self.lora_args, self.scaling = args, args.scaling
        self.lora_A = nn.Parameter(torch.empty(args.rank, self.in_features, **kind))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, args.rank, **kind))
        self.lora_dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.lora_magnitude: Optional[nn.Parameter] = None
        if base.weight.device.type != "meta":
            _init_lora_A(self.lora_A.data)
        if args.dora:
            norm = self.base_weight(torch.float32).norm(dim=1) if base.weight.device.type != "meta" else None
            self.lora_magnitude = nn.Parameter(norm.to(kind["dtype"]) if norm is not None
                                               else torch.empty(self.out_features, **kind))

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The frozen base weight as a float matrix (dequantized from FP8, GGUF blocks or NF4)."""
        weight = super().dequantized_weight(dtype).detach()
        return weight.to(dtype) if dtype is not None else weight

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """scaling * B A [out, in]."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta if dtype is None else delta.to(dtype)

    def dora_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """m / ||W + s B A|| per output row, the norm detached (DoRA section 4.3)."""
        norm = (self.base_weight(dtype) + self.delta_weight(dtype).detach()).norm(dim=1)
        return self.lora_magnitude.to(dtype) / norm.detach()

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The adapted weight W + s B A (DoRA: rescaled per row), for code that uses weights directly (MLA absorb)."""
        dtype = dtype or torch.get_default_dtype()
        weight = self.base_weight(dtype) + self.delta_weight(dtype)
        if self.lora_magnitude is not None:
            weight = weight * self.dora_factor(dtype).unsqueeze(1)
        return weight

    def merged_weight(self) -> torch.Tensor:
        """The adapted weight in the base weight's float dtype (what `merge` writes)."""
        dtype = self.weight.dtype if self.weight.element_size() > 1 else torch.float32
        return self.dequantized_weight(torch.float32).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s B A dropout(x); with DoRA, PEFT's (m/||W'|| - 1) base(x) + m/||W'|| s B A dropout(x)."""
        y = super().forward(x)
        h = self.lora_dropout(x)
        lora = F.linear(F.linear(h, self.lora_A.to(h.dtype)), self.lora_B.to(h.dtype)) * self.scaling
        if self.lora_magnitude is None:
            return y + lora
        factor = self.dora_factor(y.dtype)
        base = y if self.bias is None else y - self.bias
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            base = Linear.forward(self, h) if self.bias is None else Linear.forward(self, h) - self.bias
        return y + (factor - 1) * base + factor * lora

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return super().extra_repr() + f", lora_rank={self.lora_A.size(0)}, scaling={self.scaling:g}{dora}"


class LoraExperts(Experts):
    """Stacked SwiGLU experts with a low-rank update of each expert's gate (`w1`), up (`w3`) and down (`w2`)
    projection: what PEFT puts on transformers' per-expert `mlp.experts.N.{gate,up,down}_proj` layers.

    Parameters: the frozen `w1`, `w2`, `w3` and, for each of them, `lora_A_wK` [E, r, in] and `lora_B_wK`
    [E, out, r]. No dropout and no DoRA (PEFT has neither for expert parameters).

    Args:
        base (Experts): the experts to adapt.
        args (LoraArgs): rank, alpha, rslora.
        dtype (Optional[torch.dtype]): adapter dtype (default: the base weights').
    """

    def __init__(self, base: Experts, args: LoraArgs, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3
        self.out_scale = base.out_scale
        kind = dict(dtype=_adapter_dtype(self.w1, dtype), device=self.w1.device)
        self.lora_args, self.scaling = args, args.scaling
        for key in ("w1", "w2", "w3"):
            weight = getattr(self, key).requires_grad_(False)
            E, out, inp = weight.shape
            setattr(self, f"lora_A_{key}", nn.Parameter(torch.empty(E, args.rank, inp, **kind)))
            setattr(self, f"lora_B_{key}", nn.Parameter(torch.zeros(E, out, args.rank, **kind)))
            if weight.device.type != "meta":
                _init_lora_A(getattr(self, f"lora_A_{key}").data)

    def delta_weights(self) -> Dict[str, torch.Tensor]:
        """Per-expert updates s B_e A_e of `w1`, `w2`, `w3`, stacked like the weights."""
        return {key: torch.bmm(getattr(self, f"lora_B_{key}"), getattr(self, f"lora_A_{key}")) * self.scaling
                for key in ("w1", "w2", "w3")}

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e (its weights plus its update) to its rows of `x` (arguments as `Experts.forward`)."""
        A1, A2, A3, B1, B2, B3 = (getattr(self, f"lora_{ab}_{key}").to(x.dtype) for ab in "AB" for key in
                                  ("w1", "w2", "w3"))
        s = self.scaling
        if self.use_grouped_mm(x) and A1.size(1) * 2 % 16 == 0:
            offs = counts.cumsum(0).to(torch.int32)

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return F.grouped_mm(a, w.mT, offs=offs)

            gate = mm(x, self.w1) + mm(mm(x, A1), B1) * s
            h = F.silu(gate) * (mm(x, self.w3) + mm(mm(x, A3), B3) * s)
            return mm(h, self.w2) + mm(mm(h, A2), B2) * s
        out = []  # as `Experts.forward`: one GEMM per expert's contiguous rows (never a loop over tokens)
        for xe, w1, w2, w3, a1, a2, a3, b1, b2, b3 in zip(x.split(counts.tolist()), self.w1, self.w2, self.w3,
                                                          A1, A2, A3, B1, B2, B3):
            h = (F.silu(F.linear(xe, w1) + F.linear(F.linear(xe, a1), b1) * s)
                 * (F.linear(xe, w3) + F.linear(F.linear(xe, a3), b3) * s))
            out.append(F.linear(h, w2) + F.linear(F.linear(h, a2), b2) * s)
        return torch.cat(out)


def normalize_targets(targets: str | Sequence[str]) -> Tuple[str, ...]:
    """`lora.targets` as a tuple of names (a comma-separated string is accepted too)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError("lora.targets: must be a non-empty list of groups (attention, mlp, all) or module names "
                          "(e.g. [q_proj, v_proj] or [wq, wv])")
    return tuple(targets)


def target_modules(model: nn.Module, targets: Sequence[str], hf_names: Optional[Dict[str, str]] = None
                   ) -> List[str]:
    """Qualified names of the modules of `model.layers` that `targets` selects (the output head never).

    Args:
        model (nn.Module): a `ReasoningLLM`.
        targets (Sequence[str]): groups and/or leaf names (Verse or Hugging Face spelling).
        hf_names (Optional[Dict[str, str]]): Verse module -> Hugging Face module, to match HF leaf names.

    Returns:
        List[str]: e.g. ["layers.0.attn.wq", ...].

    Raises:
        ConfigError: a target that matches nothing in this model.
    """
    hf_names = hf_names or {}
    wanted = {name for t in targets for name in GROUPS.get(t, (t,))}
    found, used = [], set()
    for name, module in model.named_modules():
        if not name.startswith("layers.") or not isinstance(module, (Linear, Experts)):
            continue
        leaves = {name.rsplit(".", 1)[-1], hf_names.get(name, "").rsplit(".", 1)[-1]}
        hit = leaves & wanted
        if hit:
            found.append(name)
            used |= hit
    unknown = [t for t in targets if t not in GROUPS and t not in used]
    if unknown or not found:
        raise ConfigError(f"lora.targets: {', '.join(unknown or targets)} match no layer of this model; use "
                          f"attention, mlp, all or module names such as q_proj, v_proj, gate_proj")
    return found


def apply_lora(model: nn.Module, args: LoraArgs, names: Optional[Sequence[str]] = None,
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Freeze every parameter of `model` and add LoRA adapters (trainable) to the targeted layers, in place.

    Args:
        model (nn.Module): a `ReasoningLLM`.
        args (LoraArgs): rank, alpha, dropout, targets, dora, rslora.
        names (Optional[Sequence[str]]): the modules to adapt (default: `target_modules(model, args.targets)`).
        dtype (Optional[torch.dtype]): adapter dtype (default: each base weight's float dtype).

    Returns:
        nn.Module: `model`.
    """
    if args.rank < 1:
        raise ConfigError(f"lora.rank: must be a positive integer, got {args.rank!r}")
    names = list(names) if names is not None else target_modules(model, args.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, leaf)
        if isinstance(module, (LoraLinear, LoraExperts)):
            raise ConfigError(f"{name}: already has a LoRA adapter (merge it first with `verse merge`)")
        if isinstance(module, Experts):
            if args.dropout > 0 or args.dora:
                raise ConfigError("lora.dropout and lora.dora are not available for MoE experts (PEFT has neither "
                                  "for expert parameters): set lora.dropout=0 and lora.dora=false, or leave "
                                  "'experts' out of lora.targets (e.g. targets: [attention, w1, w2, w3])")
            setattr(parent, leaf, LoraExperts(module, args, dtype))
        else:
            setattr(parent, leaf, LoraLinear(module, args, dtype))
    return model


def lora_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The adapted modules of `model` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `Linear` / `Experts` modules back, in place.

    Args:
        model (nn.Module): a model with adapters (float base weights; FP8/NF4/GGUF bases are dequantized first).

    Returns:
        nn.Module: `model`, without adapters.
    """
    for name, module in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, LoraExperts):
            plain = Experts.__new__(Experts)
            nn.Module.__init__(plain)
            plain.out_scale = module.out_scale
            for key, delta in module.delta_weights().items():
                base = getattr(module, key)
                setattr(plain, key, nn.Parameter((base.float() + delta.float()).to(base.dtype)))
        else:
            weight = module.merged_weight()
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           gemm_impl=module.gemm_impl, device="meta")
            plain.init_scale = module.init_scale
            plain.weight = nn.Parameter(weight)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach())
        setattr(parent, leaf, plain)
    return model
