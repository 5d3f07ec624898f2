"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from typing import Optional


class VerseError(Exception):
    """Base class for user-facing errors (bad path, bad config, bad file): one clear line, no traceback."""


class ConfigError(VerseError, ValueError):
    """An invalid model or training configuration; the message names the field.

    Args:
        message (str): the one-line message.
        field (Optional[str]): the configuration field at fault, so a reader of another format (config.json,
            GGUF metadata) can name its own spelling of it.
    """

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class CheckpointError(VerseError):
    """A checkpoint or model file that is missing, truncated, corrupt or of an unsupported kind."""
