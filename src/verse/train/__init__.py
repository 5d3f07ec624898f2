"""Training: `TrainConfig`, `train(cfg) -> TrainResult` (what `verse train` runs) and the memory planner."""

from verse.train.config import TrainConfig
from verse.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
