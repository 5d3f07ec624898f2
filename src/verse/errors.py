"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class VerseError(Exception):
    """Base class for user-facing errors (bad path, bad config, bad file): one clear line, no traceback."""


class ConfigError(VerseError, ValueError):
    """An invalid model or training configuration; the message names the field."""


class CheckpointError(VerseError):
    """A checkpoint or model file that is missing, truncated, corrupt or of an unsupported kind."""
