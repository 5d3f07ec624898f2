"""Run checkpoints: `step-NNNNNNN/` = the model directory of DESIGN.md + `train_state/`, written atomically.

`train_state/` holds `state.safetensors` (every tensor: optimizer moments, master weights, RNG states) and
`state.json` (everything else, with references to those tensors) -- never a pickle. A checkpoint is written to
a hidden temporary directory, fsynced, and renamed into place; only then does the `latest` symlink move
(itself via an atomic rename), so a run killed at any moment leaves `latest` at a complete checkpoint.
"""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from verse.errors import CheckpointError
from verse.publish import fsync_dir, seal

LATEST = "latest"
STATE_DIR = "train_state"


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


# ---- a JSON + safetensors codec for nested state (dicts with int keys, tuples, tensors, numpy arrays) ----

def _encode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        if hasattr(obj, "codes") and hasattr(obj, "qmap"):  # torchao OptimState8bit: store its parts
            return {"__8bit__": {"codes": _encode(obj.codes, tensors), "scale": _encode(obj.scale, tensors),
                                 "qmap": _encode(obj.qmap, tensors), "signed": bool(obj.signed),
                                 "dtype": str(obj.dtype).removeprefix("torch.")}}
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().contiguous().cpu()
        return {"__tensor__": name, "device": str(obj.device)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _encode(torch.from_numpy(obj.copy()), tensors)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor], device: Optional[torch.device]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, device) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        t = tensors[obj["__tensor__"]]
        return t.to(device if device is not None and obj["device"] != "cpu" else "cpu")
    if "__8bit__" in obj:
        from torchao.optim.subclass_8bit import OptimState8bit

        d = obj["__8bit__"]
        parts = [_decode(d[k], tensors, device) for k in ("codes", "scale", "qmap")]
        return OptimState8bit(*parts, d["signed"], dtype=getattr(torch, d["dtype"]))
    if "__ndarray__" in obj:
        return _decode(obj["__ndarray__"], tensors, device).numpy()
    if "__dict__" in obj:
        return {k: _decode(v, tensors, device) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_decode(k, tensors, device): _decode(v, tensors, device) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, device) for v in obj["__tuple__"])
    raise CheckpointError(f"unrecognised entry in train_state/state.json: {sorted(obj)}")


def save_state(state: Dict[str, Any], directory: Path) -> None:
    """Write `state` as `directory/state.safetensors` + `directory/state.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(encoded))


def load_state(directory: Path, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Read what `save_state` wrote; tensors that lived on an accelerator go to `device`."""
    try:
        tensors = load_file(str(directory / "state.safetensors"))
        encoded = json.loads((directory / "state.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: incomplete training state ({Path(e.filename).name} missing); "
                              "resume from an earlier step-* directory") from None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: corrupt training state ({e}); resume from an earlier step-*") from None
    return _decode(encoded, tensors, device)


# ---- RNG states ----

def rng_state() -> Dict[str, Any]:
    """Every RNG a step can touch: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- step directories ----

def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: Dict[str, Any], tokenizer: Any = None,
                    keep_last: int = 0, adapter_base: Optional[str] = None) -> Path:
    """Write `run_dir/step-NNNNNNN/` atomically, point `latest` at it, and drop checkpoints beyond `keep_last`.

    Args:
        run_dir (Path): the run directory.
        step (int): optimizer steps done.
        model (torch.nn.Module): saved with `model.save_pretrained` (the DESIGN.md checkpoint directory).
        state (Dict[str, Any]): training state (optimizer, data position, RNG, counters) for `train_state/`.
        tokenizer: saved beside the model when given.
        keep_last (int): keep this many newest step directories (0 = all).
        adapter_base (Optional[str]): for LoRA/QLoRA runs, the base model's path: the checkpoint then holds the
            PEFT adapter (naming this base) instead of the full model.

    Returns:
        Path: the checkpoint directory.
    """
    final = run_dir / step_dirname(step)
    tmp = run_dir / f".tmp-{step_dirname(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_base is not None:
        from verse.peft import save_adapter

        save_adapter(model, tmp, base=adapter_base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, tokenizer=tokenizer)
    save_state(state, tmp / STATE_DIR)
    seal(tmp)  # normal file modes (safetensors writes 0600), flushed before the rename publishes it
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    link_tmp = run_dir / f".{LATEST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, run_dir / LATEST)
    fsync_dir(run_dir)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete `step-*` directories of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob("step-*") if p.is_dir() and (p / STATE_DIR / "state.json").is_file())


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed run left behind."""
    for tmp in Path(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Tuple[Path, int]:
    """The checkpoint `latest` points at, and its step.

    Raises:
        CheckpointError: when the run directory has no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    link = run_dir / LATEST
    target = run_dir / os.readlink(link) if link.is_symlink() else None
    if target is None or not (target / STATE_DIR / "state.json").is_file():
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{run_dir}: no complete step-* checkpoint to resume from")
        target = found[-1]
    try:
        step = int(target.name.split("-")[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{target}: not a step-NNNNNNN checkpoint directory") from None
    return target, step
