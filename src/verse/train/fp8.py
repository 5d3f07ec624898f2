"""FP8 training (`precision: fp8`): torchao's float8 training (`convert_to_float8_training`) on Hopper GPUs.

The transformer blocks' linear layers multiply in float8 (e4m3 forward, e5m2 gradients) with dynamic scales per
tensor ("tensorwise") or per row ("rowwise"), the weights and optimizer stay fp32 and everything else runs under
bf16 autocast. The output head stays in bf16 (torchtitan's choice, for the loss's accuracy), as do the MoE
experts (grouped weights, not `nn.Linear`) and the routers. torchao's float8 GEMMs (`torch._scaled_mm`) need
an NVIDIA GPU of compute capability 9.0 or newer; anywhere else the option refuses with one line.
"""

from typing import Callable, List, Optional

import torch
from torch import nn

from verse.errors import ConfigError
from verse.optional import import_torchao

RECIPES = ("tensorwise", "rowwise")
# torch._scaled_mm needs both GEMM dimensions divisible by 16
ALIGNMENT = 16


def fp8_unsupported(device: torch.device) -> Optional[str]:
    """Why FP8 training cannot run on `device`, or None when it can.

    Args:
        device (torch.device): where the run trains.

    Returns:
        Optional[str]: one line naming what is missing and what to do instead.
    """
    need = "precision=fp8 needs an NVIDIA GPU of compute capability 9.0 or newer (Hopper: H100, H200) and torchao"
    if device.type != "cuda":
        return f"{need}; this run is on {device.type}: use precision=bf16"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return (f"{need}; {torch.cuda.get_device_name(device)} is compute capability {major}.{minor}: "
                f"use precision=bf16")
    try:
        import_torchao("torchao.float8")
    except ImportError:
        return f"{need}: `pip install torchao`, or use precision=bf16"
    return None


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Whether a module trains in FP8: a floating-point `nn.Linear` of a transformer block with both sizes
    divisible by 16 (the head, the routers and the experts stay in bf16).

    Args:
        module (nn.Module): a submodule of a `ReasoningLLM`.
        fqn (str): its name in `named_modules()`.

    Returns:
        bool: convert it.
    """
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.") and ".gate" not in fqn
            and module.weight.is_floating_point() and module.weight.element_size() > 1
            and module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0)


def convert_to_fp8(model: nn.Module, recipe: str, device: torch.device,
                   check: Callable[[torch.device], Optional[str]] = fp8_unsupported) -> List[str]:
    """Swap the eligible linear layers of `model` for torchao `Float8Linear`s (in place), after checking the device.

    Args:
        model (nn.Module): a `ReasoningLLM` with floating-point weights.
        recipe (str): "tensorwise" or "rowwise" scaling (`torchao.float8.Float8LinearConfig.from_recipe_name`).
        device (torch.device): where it trains.
        check (Callable[[torch.device], Optional[str]]): the capability check (`fp8_unsupported`).

    Returns:
        List[str]: the names of the converted modules.

    Raises:
        ConfigError: the device cannot train in FP8, or an unknown recipe.
    """
    reason = check(device)
    if reason is not None:
        raise ConfigError(reason, "precision")
    if recipe not in RECIPES:
        raise ConfigError(f"fp8_recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}", "fp8_recipe")
    float8 = import_torchao("torchao.float8")
    Float8LinearConfig, convert_to_float8_training = float8.Float8LinearConfig, float8.convert_to_float8_training

    converted: List[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        if fp8_eligible(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=keep)
    return converted
