"""LoRA adapters in PEFT's file format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for the transformers model of the base: `base_model.model.<HF module>.lora_A.weight`
[r, in], `.lora_B.weight` [out, r] and, with DoRA, `.lora_magnitude_vector` [out]. The Verse <-> Hugging Face module
names (and the rotary-row order of DeepSeek query/key projections, which `lora_B` and the magnitude follow) come
from the checkpoint adapters' own `to_hf` (`verse.interop.llama` / `verse.interop.deepseek`): one mapping for
weights and adapters alike. MoE experts are written per expert, `...mlp.experts.N.gate_proj.lora_A.weight`, the
layout PEFT gives transformers' per-expert DeepSeek modules (PEFT converts it for transformers 5's fused experts).
"""

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from verse.errors import CheckpointError
from verse.interop.hf import adapter_for
from verse.jsonio import read_json
from verse.model.linear import Linear
from verse.model.moe import Experts
from verse.peft.lora import LoraArgs, LoraExperts, LoraLinear, apply_lora, lora_modules
from verse.publish import check_destination, staged

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_KEY = re.compile(r"(.+)\.(\d+)\.([a-z_]+)\.weight")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding a PEFT adapter (its `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def hf_layout(model: nn.Module) -> Dict[str, Tuple[str, Optional[torch.Tensor]]]:
    """For each adaptable module of `model.layers`: its Hugging Face module name and, for a `Linear`, the order of
    its output rows in the HF file (`hf_rows = verse_rows[order]`; DeepSeek's interleaved rotary rows), from the
    checkpoint adapter's `to_hf`.

    Args:
        model (nn.Module): a `ReasoningLLM`.

    Returns:
        Dict[str, Tuple[str, Optional[torch.Tensor]]]: Verse module -> (HF module, row order or None for experts,
        whose HF name is the `experts` container of the per-expert modules).
    """
    adapter = adapter_for(model.args.arch, "verse.json")
    layout: Dict[str, Tuple[str, Optional[torch.Tensor]]] = {}
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        if isinstance(module, Linear):
            rows = torch.arange(module.out_features, dtype=torch.float64).unsqueeze(1)
            (hf, order), = adapter.to_hf({f"{name}.weight": rows}, model.args).items()
            layout[name] = (hf.removesuffix(".weight"), order.squeeze(1).long())
        elif isinstance(module, Experts):
            hf = next(iter(adapter.to_hf({f"{name}.w1": torch.zeros(module.w1.size(0), 1, 1)}, model.args)))
            layout[name] = (EXPERT_KEY.fullmatch(hf).group(1), None)
    return layout


def expert_names() -> Dict[str, str]:
    """Verse expert weight -> HF per-expert projection (`w1` -> `gate_proj`), the DeepSeek adapter's table."""
    from verse.interop.deepseek import EXPERT_WEIGHTS

    return EXPERT_WEIGHTS


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters of `model` under PEFT's names (see the module docstring).

    Args:
        model (nn.Module): a `ReasoningLLM` with adapters.

    Returns:
        Dict[str, torch.Tensor]: PEFT name -> tensor (contiguous, detached).
    """
    layout = hf_layout(model)
    out: Dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        hf, order = layout[name]
        if isinstance(module, LoraLinear):
            out[f"{PREFIX}{hf}.lora_A.weight"] = _whole(module.lora_A)
            out[f"{PREFIX}{hf}.lora_B.weight"] = _whole(module.lora_B)[order]
            if module.lora_magnitude is not None:
                out[f"{PREFIX}{hf}.lora_magnitude_vector"] = _whole(module.lora_magnitude)[order]
            continue
        for key, proj in expert_names().items():
            for ab in "AB":
                for e, matrix in enumerate(_whole(getattr(module, f"lora_{ab}_{key}")).unbind(0)):
                    out[f"{PREFIX}{hf}.{e}.{proj}.lora_{ab}.weight"] = matrix
    return {k: v.detach().contiguous() for k, v in out.items()}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one full tensor: a sharded one (FSDP2's DTensor) is gathered from every rank, which must all
    call this in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor


def adapter_config(model: nn.Module, args: LoraArgs, base: Optional[str] = None) -> Dict[str, Any]:
    """The `adapter_config.json` PEFT reads (`LoraConfig` fields).

    Args:
        model (nn.Module): the model with adapters (its adapted modules give `target_modules`).
        args (LoraArgs): rank, alpha, dropout, dora, rslora.
        base (Optional[str]): `base_model_name_or_path`: where the base model lives.

    Returns:
        Dict[str, Any]: the config.
    """
    layout = hf_layout(model)
    leaves = set()
    for name, module in lora_modules(model).items():
        if isinstance(module, LoraExperts):
            leaves.update(expert_names().values())
        else:
            leaves.add(layout[name][0].rsplit(".", 1)[-1])
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": args.rank,
            "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": sorted(leaves),
            "use_dora": args.dora, "use_rslora": args.rslora, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None}


def lora_args_of(model: nn.Module) -> LoraArgs:
    """The `LoraArgs` the adapters of `model` were made with (rank, scaling, dropout, DoRA)."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise CheckpointError("the model has no LoRA adapters to save")
    return next((m for m in modules if isinstance(m, LoraLinear)), modules[0]).lora_args


def save_adapter(model: nn.Module, path: str | Path, args: Optional[LoraArgs] = None, base: Optional[str] = None,
                 overwrite: bool = False, state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write the adapters of `model` as a PEFT adapter directory, published atomically (`verse.publish`).

    Args:
        model (nn.Module): a `ReasoningLLM` with adapters.
        path (str | Path): target directory: new or empty, or an adapter directory (its adapter files replaced,
            other entries kept); any other non-empty directory only with `overwrite`.
        args (Optional[LoraArgs]): the adapter settings (default: read back from the modules).
        base (Optional[str]): the base model's path or Hub id, recorded as `base_model_name_or_path`.
        overwrite (bool): replace a non-empty `path` whole.
        state (Optional[Dict[str, torch.Tensor]]): `adapter_state_dict(model)` when already taken (a sharded model's,
            gathered by every rank).

    Returns:
        Path: the directory.
    """
    args = args or lora_args_of(model)
    dense_mlp = [n for n, m in lora_modules(model).items() if isinstance(m, LoraLinear) and ".ffn." in n]
    if dense_mlp and model.args.attention == "mla":
        warnings.warn(f"{dense_mlp[0]}: PEFT with transformers 5 maps gate/up/down_proj adapters of DeepSeek models "
                      f"to the routed experts only, so adapters on dense or shared-expert MLP layers load exactly in "
                      f"Verse (and in PEFT with transformers 4), not in PEFT with transformers 5", stacklevel=2)
    target = Path(path).expanduser()
    resave = target.is_dir() and not target.is_symlink() and (target / ADAPTER_CONFIG).is_file()
    target = check_destination(target, overwrite=overwrite or resave)
    state = {k: v.cpu() for k, v in (adapter_state_dict(model) if state is None else state).items()}
    config = adapter_config(model, args, base)
    existing = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    keep = [] if overwrite else [name for name in existing if name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
    with staged(target, replace=bool(existing), keep=keep) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return target


def read_adapter_config(path: str | Path) -> Tuple[LoraArgs, Dict[str, Any]]:
    """`LoraArgs` of a PEFT adapter directory, refusing what Verse cannot reproduce exactly.

    Args:
        path (str | Path): the adapter directory.

    Returns:
        Tuple[LoraArgs, Dict[str, Any]]: the settings and the raw config.
    """
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    config = read_json(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key in ("rank_pattern", "alpha_pattern", "target_parameters", "modules_to_save", "layers_to_transform"):
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key} is not supported by Verse (one rank and alpha for every "
                                  f"adapted module); merge it with PEFT's merge_and_unload instead")
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out") or config.get("lora_bias"):
        raise CheckpointError(f"{config_path}: adapters with biases or fan_in_fan_out are not supported")
    try:
        args = LoraArgs(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout") or 0.0), dora=bool(config.get("use_dora")),
                        rslora=bool(config.get("use_rslora")))
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    return args, config


def load_adapter(model: nn.Module, path: str | Path, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Add the adapters of a PEFT adapter directory (written by Verse or by PEFT) to `model`, without merging
    (or, when `model` already has the same adapters, read their values).

    Args:
        model (nn.Module): the base `ReasoningLLM` (the one the adapter was trained on).
        path (str | Path): the adapter directory.
        dtype (Optional[torch.dtype]): adapter dtype (default: the base weights').

    Returns:
        nn.Module: `model`, with adapters (trainable; every base parameter frozen).
    """
    path = Path(path)
    args, _ = read_adapter_config(path)
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (PEFT's .bin pickles are not read)") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: corrupt or truncated safetensors file ({e})") from None
    layout = hf_layout(model)
    by_hf = {hf: name for name, (hf, _) in layout.items()}
    names = set()
    for key in tensors:
        module = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        expert = EXPERT_KEY.fullmatch(module + ".weight")
        name = by_hf.get(module) or (by_hf.get(expert.group(1)) if expert else None)
        if not key.startswith(PREFIX) or name is None:
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor {key} matches no layer of this "
                                  f"{model.args.arch} model; was the adapter trained on another base?")
        names.add(name)
    present = lora_modules(model)
    if not present:
        apply_lora(model, args, sorted(names), dtype)
    elif set(present) != names:  # resuming a run: the adapters exist, only their values are read
        raise CheckpointError(f"{path}: adapts other layers than this model's adapters")
    used = set()

    def take(key: str, shape: torch.Size) -> torch.Tensor:
        tensor = tensors.get(key)
        if tensor is None:
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor {key} is missing")
        if tensor.shape != shape:
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, this model "
                                  f"needs {tuple(shape)} (rank {args.rank}); was it trained on another base?")
        used.add(key)
        return tensor

    with torch.no_grad():
        for name, module in lora_modules(model).items():
            hf, order = layout[name]
            if isinstance(module, LoraLinear):
                inverse = torch.argsort(order)
                module.lora_A.copy_(take(f"{PREFIX}{hf}.lora_A.weight", module.lora_A.shape))
                module.lora_B.copy_(take(f"{PREFIX}{hf}.lora_B.weight", module.lora_B.shape)[inverse])
                if module.lora_magnitude is not None:
                    magnitude = take(f"{PREFIX}{hf}.lora_magnitude_vector", module.lora_magnitude.shape)
                    module.lora_magnitude.copy_(magnitude[inverse])
                continue
            for key, proj in expert_names().items():
                for ab in "AB":
                    stacked = getattr(module, f"lora_{ab}_{key}")
                    stacked.copy_(torch.stack([take(f"{PREFIX}{hf}.{e}.{proj}.lora_{ab}.weight", stacked.shape[1:])
                                               for e in range(stacked.size(0))]))
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor {unused[0]} was not recognised")
    return model
