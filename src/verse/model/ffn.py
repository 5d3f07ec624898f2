"""The SwiGLU feed-forward block (Shazeer, 2020)."""

import torch
import torch.nn.functional as F
from torch import nn

from verse.model.linear import Linear, linears


class MLP(nn.Module):
    """w2(silu(w1 x) * w3 x): gate (w1), up (w3) and down (w2) projections.

    Args:
        dim (int): model width.
        inter_dim (int): hidden width.
        out_scale (float): `init_weights` std multiplier of the down projection (a residual output: GPT-2's
            1/sqrt(2 * n_layers)).
    """

    def __init__(self, dim: int, inter_dim: int, out_scale: float = 1.0):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.w2.init_scale = out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN to `x` [..., dim]."""
        gate, up = linears(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)
