"""The linear layer every projection uses, and the module-level `gemm_impl` switch ("bf16" | "fp8")."""

import torch
import torch.nn.functional as F
from torch import nn

gemm_impl = "bf16"


class Linear(nn.Linear):
    """`nn.Linear` without bias by default; the single place where GEMM implementations are chosen.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): add a learnable bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T (+ b)."""
        return F.linear(x, self.weight, self.bias)
