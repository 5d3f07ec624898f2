"""RMSNorm (Zhang & Sennrich, 2019)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: x / rms(x) * weight, computed in float32 like Llama.

    Args:
        dim (int): size of the last dimension.
        eps (float): added to the mean square for stability.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Weight = 1 (`std` is accepted for a uniform signature and unused)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension of `x`; output has `x`'s dtype."""
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight
