"""The linear layer every projection uses; each layer runs its own `gemm_impl` ("bf16" | "fp8" | "gguf").

A `Linear` holds a floating-point weight, or an FP8 one as in DeepSeek-V3 checkpoints: a float8_e4m3fn
`weight` and its float32 block scales `scale` [ceil(out/128), ceil(in/128)] (`weight_scale_inv` in Hugging
Face files), so that weight ~= fp8 * scale per 128x128 block. FP8 weights run in either `gemm_impl`:
"bf16" dequantizes the weight and multiplies in the activations' dtype; "fp8" quantizes the activations per
token (`act_quant`) and multiplies the FP8 operands (`fp8_gemm`).

A `Linear` can also hold a GGUF file's quantized blocks (`gemm_impl="gguf"`): a uint8 `weight`
[out, in / block values * block bytes] of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K blocks, multiplied as
they are by `verse.ggml.gemm`.

For inference a `Linear` can also hold an int8 weight with one scale per output row (`int8_()`, weight-only
quantization as torchao's int8 weight-only config): half the bytes of bf16 read per decoded token, multiplied by
`torch._weight_int8pack_mm` on CPU (activations stay in their dtype).
"""

from typing import Collection, List, Mapping, Optional, Set

import torch
import torch.nn.functional as F
from torch import nn

import verse.ggml as ggml
from verse.errors import VerseError
from verse.fp8 import BLOCK_SIZE, FP8_DTYPE, act_quant, fp8_gemm, weight_dequant, weight_quant


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           scale: Optional[torch.Tensor] = None, gemm_impl: str = "bf16",
           block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """y = x W^T (+ b), for a floating-point weight or an FP8 weight with its block `scale`.

    Args:
        x (torch.Tensor): input [..., in_features].
        weight (torch.Tensor): [out_features, in_features], any float dtype or float8_e4m3fn.
        bias (Optional[torch.Tensor]): [out_features].
        scale (Optional[torch.Tensor]): the FP8 weight's float32 block scales.
        gemm_impl (str): for an FP8 weight, "fp8" multiplies FP8 operands; anything else dequantizes the weight.
        block_size (int): the FP8 block edge.

    Returns:
        torch.Tensor: [..., out_features] in `x`'s dtype.
    """
    if weight.element_size() > 1:
        return F.linear(x, weight, bias)
    if gemm_impl != "fp8":
        return F.linear(x, weight_dequant(weight, scale, block_size, x.dtype), bias)
    x_fp8, x_scale = act_quant(x, block_size)
    y = fp8_gemm(x_fp8, x_scale, weight, scale, block_size, x.dtype)
    return y if bias is None else y.add_(bias)


class Linear(nn.Linear):
    """`nn.Linear` without bias by default; the single place where GEMM implementations are chosen.

    After `quantize_()` (or when built for an FP8 checkpoint) `weight` is float8_e4m3fn and `scale` holds its
    float32 128x128 block scales; otherwise `scale` is None. After `ggml_()` `weight` holds GGUF blocks of
    type `ggml_type` (else None). `gemm_impl` and `block_size` belong to the layer (a `ReasoningLLM` sets its
    layers' `gemm_impl` from `ModelArgs.gemm_impl`), so models built with different settings never interfere.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): add a learnable bias.
        gemm_impl (str): how FP8 weights multiply: "bf16" (dequantize) or "fp8" (FP8 GEMM).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, gemm_impl: str = "bf16", **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.register_parameter("scale", None)
        self.register_buffer("int8_scale", None, persistent=False)  # per output row, with an int8 weight (int8_)
        self.ggml_type: Optional[int] = None
        self.gemm_impl = gemm_impl
        self.block_size = BLOCK_SIZE
        # std multiplier of `init_weights`, set by the owner: 1/sqrt(2 * n_layers) for residual output projections
        self.init_scale = 1.0

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Weight ~ N(0, std * init_scale) (GPT-2 style), bias 0: this layer's own parameters only."""
        nn.init.normal_(self.weight, mean=0.0, std=std * self.init_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def is_fp8(self) -> bool:
        """Whether the weight is stored in FP8 with block scales."""
        return self.scale is not None

    def ggml_(self, row_bytes: int, qtype: Optional[int] = None) -> "Linear":
        """Give the layer the layout of GGUF blocks (inference only), ready for `load_state_dict` on `meta`.

        Args:
            row_bytes (int): bytes per weight row; with `in_features` it tells Q4_0, Q4_1 or Q8_0 apart.
            qtype (Optional[int]): the GGML type (needed for the K-quants: a Q4_K row is as long as a Q4_0 one);
                None = told from `row_bytes`.

        Returns:
            Linear: self.
        """
        if qtype is None:
            qtype = ggml.block_type(row_bytes, self.in_features)
        elif ggml.row_bytes(qtype, self.in_features) != row_bytes:
            raise ValueError(f"a row of {row_bytes} bytes is not {self.in_features} values in {ggml.NAMES[qtype]} "
                             "blocks")
        self.ggml_type = qtype
        self.weight = nn.Parameter(torch.empty(self.out_features, row_bytes, dtype=torch.uint8,
                                               device=self.weight.device), requires_grad=False)
        return self

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as a floating-point matrix (for code that uses it directly, e.g. MLA's weight absorption).

        Args:
            dtype (Optional[torch.dtype]): dtype of a dequantized FP8 weight; default the torch default dtype.

        Returns:
            torch.Tensor: [out_features, in_features]; the weight itself when it is not FP8 or GGUF blocks.
        """
        if self.ggml_type is not None:
            return ggml.dequantize(self.weight, self.ggml_type, dtype or torch.get_default_dtype())
        if self.int8_scale is not None:
            dtype = dtype or self.int8_scale.dtype
            return self.weight.to(dtype) * self.int8_scale.to(dtype)[:, None]
        return self.weight if self.scale is None else weight_dequant(self.weight, self.scale, self.block_size, dtype)

    @torch.no_grad()
    def quantize_(self) -> "Linear":
        """Store the weight as float8_e4m3fn with 128x128 block scales, in place (inference only: no gradients).

        On the `meta` device this only gives the layer the FP8 layout, ready for `load_state_dict`.

        Returns:
            Linear: self.
        """
        weight, scale = weight_quant(self.weight, self.block_size)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        return self

    @torch.no_grad()
    def int8_(self) -> "Linear":
        """Store the floating-point weight as int8 with one scale per output row, in place (inference only).

        Symmetric round-to-nearest on the grid of the stored scale: scale = max |w| of the row / 127 in the weight's
        dtype (the activations' dtype at inference), int8 = round(w / scale) clamped to +-127.

        Returns:
            Linear: self.
        """
        if self.ggml_type is not None or self.is_fp8 or not self.weight.dtype.is_floating_point:
            raise VerseError(f"int8 weight-only quantization needs a floating-point weight, this layer holds "
                             f"{self.extra_repr()}")
        weight = self.weight.float()
        scale = (weight.abs().amax(1) / 127).to(self.weight.dtype).clamp_(min=torch.finfo(self.weight.dtype).tiny)
        quantized = (weight / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.int8_scale = scale
        self.weight = nn.Parameter(quantized, requires_grad=False)
        return self

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` casts every floating-point tensor, float8 included, which would silently drop the
        # block scaling: FP8 weights and their float32 scales only follow device moves.
        if self.scale is None:
            return super()._apply(fn, recurse)
        weight, scale = self.weight.detach(), self.scale.detach()  # the parameters' data may be swapped
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
            self.scale = nn.Parameter(scale.to(self.weight.device), requires_grad=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T (+ b), through `linear` (FP8 weights follow `gemm_impl`) or on the GGUF blocks."""
        if self.ggml_type is not None:
            y = ggml.gemm(x, self.weight, self.ggml_type)
            return y if self.bias is None else y.add_(self.bias)
        if self.int8_scale is not None:
            y = int8_linear(x, self.weight, self.int8_scale)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias, self.scale, self.gemm_impl, self.block_size)

    def extra_repr(self) -> str:
        kind = (", fp8" if self.is_fp8 else f", {ggml.NAMES[self.ggml_type]}" if self.ggml_type is not None
                else ", int8" if self.int8_scale is not None else "")
        return super().extra_repr() + kind


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x (weight * scale[:, None])^T for an int8 `weight` [out, in] with per-row `scale` [out].

    On CPU through `torch._weight_int8pack_mm`, which reads the int8 weight as it is: about 2x faster than a bf16
    GEMV for one row, but one GEMV per row (16 rows or more run about 2x slower than a bf16 GEMM: prompts, wide
    batches); elsewhere the weight is widened to `x`'s dtype first.

    Args:
        x (torch.Tensor): input [..., in], floating point.
        weight (torch.Tensor): int8 [out, in].
        scale (torch.Tensor): [out].

    Returns:
        torch.Tensor: [..., out] in `x`'s dtype.
    """
    scale = scale.to(x.dtype)
    if x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).contiguous(), weight, scale)
        return y.view(*x.shape[:-1], weight.size(0))
    return F.linear(x, weight.to(x.dtype) * scale[:, None])


def int8_weights_(model: nn.Module) -> nn.Module:
    """Quantize the floating-point weights of every plain `Linear` of `model` to int8 with per-row scales
    (`Linear.int8_`), for inference. A head tied to the embedding gets its own int8 copy (the embedding, one row
    read per token, stays as it is); layers that hold FP8 or GGUF blocks, and LoRA layers (an adapter applied on
    top), keep their weights.

    Args:
        model (nn.Module): any module containing `Linear` layers.

    Returns:
        nn.Module: `model`, changed in place.
    """
    for module in model.modules():
        if type(module) is Linear and module.ggml_type is None and not module.is_fp8 and module.int8_scale is None:
            module.int8_()
    return model


def linears(x: torch.Tensor, *layers: "Linear") -> List[torch.Tensor]:
    """`[layer(x) for layer in layers]`, in one kernel call when all of them hold GGUF blocks (decoding a GGUF
    model: a layer's query/key/value or gate/up projections share the input).

    Args:
        x (torch.Tensor): input [..., in_features].
        *layers (Linear): layers with the same `in_features`.

    Returns:
        List[torch.Tensor]: each layer's output.
    """
    # only plain `Linear`s: a subclass (e.g. a LoRA layer) adds to its output in its own forward
    if all(type(layer) is Linear and layer.ggml_type is not None and layer.bias is None for layer in layers):
        return ggml.gemm_many(x, [layer.weight for layer in layers], [layer.ggml_type for layer in layers])
    return [layer(x) for layer in layers]


def fp8_layers(state_dict: Mapping[str, torch.Tensor]) -> Set[str]:
    """Names of the layers whose weight is FP8 in a Verse state dict (they have `NAME.weight` and `NAME.scale`).

    Args:
        state_dict (Mapping[str, torch.Tensor]): Verse weight names (HF `*.weight_scale_inv` renamed `*.scale`).

    Returns:
        Set[str]: module names, e.g. {"layers.0.attn.wq"}.
    """
    layers = {name.removesuffix(".scale") for name in state_dict if name.endswith(".scale")}
    return {layer for layer in layers if getattr(state_dict.get(f"{layer}.weight"), "dtype", None) == FP8_DTYPE}


def quantize_(model: nn.Module, names: Optional[Collection[str]] = None) -> nn.Module:
    """Store the weights of `model`'s `Linear` layers in FP8 with 128x128 block scales (DeepSeek-V3 layout).

    To load an FP8 checkpoint, build the model (on `meta` is fine), call `quantize_(model, fp8_layers(sd))`,
    then `model.load_state_dict(sd)`.

    Args:
        model (nn.Module): any module containing `Linear` layers.
        names (Optional[Collection[str]]): qualified names of the layers to convert; default all of them but a
            head tied to the embedding.

    Returns:
        nn.Module: `model`, changed in place.
    """
    tied = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or (names is not None and name not in names):
            continue
        if names is None and id(module.weight) in tied:
            continue  # an output head tied to the embedding stays as it is
        module.quantize_()
    return model


def set_gemm_impl(model: nn.Module, gemm_impl: str) -> nn.Module:
    """Make every `Linear` of `model` multiply its FP8 weights the `gemm_impl` way ("bf16" or "fp8").

    Args:
        model (nn.Module): any module containing `Linear` layers.
        gemm_impl (str): "bf16" or "fp8" (`ModelArgs.gemm_impl`; "gguf" layers hold blocks and ignore it).

    Returns:
        nn.Module: `model`, changed in place.
    """
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemm_impl = gemm_impl
    return model
