"""QLoRA's frozen base (Dettmers et al., arXiv:2305.14314): weights in 4-bit NormalFloat with double quantization,
through torchao's `NF4Tensor` (CPU and CUDA; FSDP2 shards it), dequantized to the activations' dtype (bf16 under
autocast) inside each matmul.

Storage per weight: 4 bits of data, one 8-bit quantized absmax per `NF4_BLOCK` (64) values, and per
`SCALER_BLOCK` (256) absmaxes one fp32 scale: 0.5 + 1/64 + 4/(64*256) bytes, about 0.516 bytes per parameter.
"""

import math
from typing import Optional, Sequence

import torch
from torch import nn

from verse.errors import ConfigError
from verse.optional import import_torchao
from verse.model.linear import Linear

NF4_BLOCK = 64
SCALER_BLOCK = 256
# bytes per parameter of an NF4 weight with double quantization (codes + int8 absmax + fp32 second-level scale)
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * SCALER_BLOCK)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as torchao's NF4Tensor (block 64; double quantization over up to 256 absmaxes).

    Args:
        weight (torch.Tensor): a floating-point matrix whose size is a multiple of 64.

    Returns:
        torch.Tensor: the NF4Tensor (reports the input's float dtype; `.to(dtype)` dequantizes).
    """
    torchao_to_nf4 = import_torchao("torchao.quantization").to_nf4

    blocks = weight.numel() // NF4_BLOCK
    # torchao double-quantizes the absmaxes in groups that must divide their count: 256, or the largest divisor
    return torchao_to_nf4(weight.detach().contiguous(), NF4_BLOCK, math.gcd(blocks, SCALER_BLOCK))


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a torchao NF4Tensor."""
    return type(tensor).__name__ == "NF4Tensor"


@torch.no_grad()
def quantize_nf4_(model: nn.Module, names: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.bfloat16,
                  device: Optional[torch.device | str] = None) -> nn.Module:
    """Store the weights of the `Linear` layers of `model.layers` in NF4, frozen, in place (QLoRA's base).

    The embedding, the output head, norms, routers and stacked MoE experts keep their dtype. With `device`, each
    weight moves there one at a time just before it is quantized, and then the rest of the model follows: a base
    loaded on the CPU never exists on the accelerator in more than NF4 plus one bf16 weight.

    Args:
        model (nn.Module): a `ReasoningLLM`.
        names (Optional[Sequence[str]]): qualified layer names (default: every `Linear` inside `model.layers`).
        dtype (torch.dtype): dtype the weights are rounded to before quantization (and dequantize to).
        device (Optional[torch.device | str]): where the quantized model goes (default: where it is).

    Returns:
        nn.Module: `model`.
    """
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or not name.startswith("layers.") or (names is not None and
                                                                                name not in names):
            continue
        if module.is_fp8 or module.ggml_type is not None:
            raise ConfigError(f"{name}: finetune.method=qlora needs a float base; this weight is FP8/GGUF blocks "
                              f"(convert the checkpoint to bf16 first)")
        if module.weight.numel() % NF4_BLOCK:
            raise ConfigError(f"{name}: {tuple(module.weight.shape)} weights are not a multiple of {NF4_BLOCK} "
                              f"values, which NF4 blocks need; use finetune.method=lora for this model")
        if not is_nf4(module.weight):
            weight = module.weight.to(device=device, dtype=dtype)
            module.weight = nn.Parameter(to_nf4(weight), requires_grad=False)
    if device is not None and torch.device(device) != model.embed.weight.device:
        model.to(device)
        model.reset_buffers()
    return model


def check_nf4_shardable(model: nn.Module, shards: int) -> None:
    """Refuse, in one line, an NF4 base FSDP2 cannot shard evenly over `shards` ranks: torchao's NF4Tensor splits
    its codes, absmaxes and second-level scales by rows, so each of them (and the rows) must divide by `shards`.

    Args:
        model (nn.Module): a model whose `Linear` weights may be NF4 (`quantize_nf4_`).
        shards (int): the ranks FSDP2 shards over (the `dp_shard` size).

    Raises:
        ConfigError: naming the first weight that does not divide.
    """
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or not is_nf4(module.weight):
            continue
        w = module.weight
        parts = {"rows": w.size(0), "absmax blocks": w.quantized_scalers.numel(),
                 "scale groups": w.quantization_factor.numel()}
        bad = [f"{count} {what}" for what, count in parts.items() if count % shards]
        if bad:
            raise ConfigError(f"{name}: its NF4 weight {tuple(w.shape)} has {', '.join(bad)}, which "
                              f"{shards} FSDP2 shards cannot split evenly; use a parallel.dp_shard that divides "
                              f"them, or finetune.method=lora")
