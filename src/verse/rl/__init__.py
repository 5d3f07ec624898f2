"""Reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath) on Verse's own pieces."""
