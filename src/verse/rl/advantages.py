"""Group-relative advantages (GRPO, Shao et al. 2024, eq. 3 outcome supervision; Dr. GRPO, Liu et al. 2025)."""

import torch

from verse.errors import VerseError


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    `(r - mean_group) / (std_group + eps)`; with `scale=False` (Dr. GRPO) just `r - mean_group`, which drops the
    bias towards groups whose rewards barely differ. The std is the population std (divides by the group size), so
    a group of one has std 0 and advantage 0 rather than NaN.

    Args:
        rewards (torch.Tensor): [N] rewards, the `group_size` completions of each prompt next to each other.
        group_size (int): completions per prompt.
        scale (bool): divide by the group's std (GRPO) or not (Dr. GRPO).
        eps (float): added to the std so a group of equal rewards gives 0, not NaN.

    Returns:
        torch.Tensor: [N] float32 advantages.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise VerseError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, correction=0, keepdim=True) + eps)
    return centered.view(-1)
