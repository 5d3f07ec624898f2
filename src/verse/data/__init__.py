"""Data pipeline: Hub and local sources -> conversations -> token ids + loss mask -> packed, mixed batches."""

from verse.data.config import DataConfig, SourceConfig
from verse.data.loader import DataLoader, build_loader

__all__ = ["DataConfig", "DataLoader", "SourceConfig", "build_loader"]
