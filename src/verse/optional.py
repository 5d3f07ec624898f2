"""Optional dependencies imported without their import-time noise.

torchao's import logs a warning for each compiled extension that does not fit this machine (e.g. "Failed to load
.../_C_mxfp8...so" on a CPU-only torch) and makes torch's pytree log deprecation warnings for its enums: lines a
user cannot act on. They are silenced for the import alone; torchao's later warnings are kept.
"""

import contextlib
import importlib
import logging
from types import ModuleType
from typing import Iterator

# the loggers torchao's import speaks through (its own, and torch's pytree registration of its enums)
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to `level` inside the block, then restore them."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous):
            logger.setLevel(old)


def import_torchao(module: str = "torchao") -> ModuleType:
    """`importlib.import_module(module)` for torchao or one of its submodules, without its import-time warnings.

    Args:
        module (str): e.g. "torchao.optim".

    Returns:
        ModuleType: the module.

    Raises:
        ImportError: torchao is not installed (callers turn it into one line naming the option that needs it).
    """
    with quiet_loggers(*TORCHAO_IMPORT_LOGGERS):
        return importlib.import_module(module)
