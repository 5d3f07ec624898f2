"""Learning-rate schedules: linear warmup, then cosine, linear, constant, or warmup-stable-decay (WSD)."""

import math


def lr_at(step: int, *, lr: float, min_lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Args:
        step (int): the step about to be taken.
        lr (float): peak learning rate.
        min_lr (float): final learning rate.
        max_steps (int): total steps.
        warmup_steps (int): linear warmup from lr/warmup_steps to lr.
        schedule (str): cosine | linear | wsd | constant.
        decay_fraction (float): WSD: the last `decay_fraction * max_steps` steps decay linearly to `min_lr`
            (Hu et al., 2024, MiniCPM).

    Returns:
        float: the learning rate.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return lr + (min_lr - lr) * progress
    progress = min(1.0, (step - warmup_steps + 1) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
