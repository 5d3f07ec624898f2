"""The torch device a command runs on, checked before anything is loaded (one line when it cannot be used)."""

import torch

from verse.errors import ConfigError


def resolve_device(name: str, option: str = "device") -> torch.device:
    """Parse and check a device name: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N", "mps".

    Args:
        name (str): the device the user asked for.
        option (str): how the error names the setting (e.g. "--device" or "device").

    Returns:
        torch.device: a device this machine has.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{option}={name!r} is not a device; use cpu, cuda or cuda:N", option) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}={name}: CUDA is not available on this machine; use cpu", option)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)", option)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{option}={name}: MPS is not available on this machine; use cpu", option)
    elif device.type != "cpu":
        raise ConfigError(f"{option}={name}: Verse runs on cpu, cuda or mps, not {device.type}", option)
    return device
