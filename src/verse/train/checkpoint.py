"""Run directories and their checkpoints: `step-NNNNNNN/` = the model directory of DESIGN.md + `train_state/`,
written atomically.

A run directory is one `verse train` created: it holds the marker `verse-run.json`. Training writes only into a
new (or empty) directory, which it marks, or into a marked one with `--resume`; anything else is refused, so a
user's own files are never overwritten, appended to or deleted.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from verse.errors import CheckpointError, ConfigError
from verse.interop.dcp import ARGS_FILE, DCP_DIR
from verse.jsonio import read_json
from verse.optional import import_torchao
from verse.publish import fsync_dir, publish, seal

LATEST = "latest"
STATE_DIR = "train_state"
RUN_MARKER = "verse-run.json"
CONFIG_FILE = "config.yaml"


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
        OptimState8bit = import_torchao("torchao.optim.subclass_8bit").OptimState8bit

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


def load_state(directory: Path, device: Optional[torch.device] = None, required: Sequence[str] = ()
               ) -> Dict[str, Any]:
    """Read what `save_state` wrote; tensors that lived on an accelerator go to `device`.

    Args:
        directory (Path): the `train_state/` directory.
        device (Optional[torch.device]): where accelerator tensors go.
        required (Sequence[str]): top-level keys the state must have.

    Raises:
        CheckpointError: a missing, truncated or malformed file (one line naming it).
    """
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{directory}: corrupt training state ({what}); move this step-* directory away to "
                               "resume from the one before it")

    try:
        tensors = load_file(str(directory / "state.safetensors"))
        encoded = json.loads((directory / "state.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: incomplete training state ({Path(e.filename).name} missing); "
                              "move this step-* directory away to resume from the one before it") from None
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise corrupt(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        state = _decode(encoded, tensors, device)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise corrupt(f"state.json does not match state.safetensors: {type(e).__name__} {e}") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise corrupt(f"state.json lacks {', '.join(missing)}")
    return state


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
    final, tmp = run_dir / step_dirname(step), run_dir / f".tmp-{step_dirname(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_base is not None:
        from verse.interop.adapter import save_adapter

        save_adapter(model, tmp, base=adapter_base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, tokenizer=tokenizer)
    save_state(state, tmp / STATE_DIR)
    _publish_step(run_dir, tmp, final, keep_last)
    return final


def _publish_step(run_dir: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Seal `tmp`, rename it to `final`, move `latest` there, drop checkpoints beyond `keep_last`."""
    seal(tmp)  # normal file modes (safetensors writes 0600), flushed before the rename publishes it
    # a re-saved step is exchanged for its new copy in one atomic step: a complete step is never deleted first
    publish(tmp, final, replace=True)
    link_tmp = run_dir / f".{LATEST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, run_dir / LATEST)
    fsync_dir(run_dir)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: Dict[str, Any], dist: Any, tokenizer: Any = None, keep_last: int = 0,
                 adapter_base: Optional[str] = None) -> Path:
    """Every rank writes its shards of the model and optimizer in parallel (DCP); `latest` moves only after all did.

    The step directory holds `dcp/` (DCP files + `verse.json`), `train_state/` (counters, RNG, every data rank's
    loader position) and the tokenizer. `verse.load` and `verse convert RUN_DIR OUT` read it in one process; a run
    resumes from it on any number of ranks (DCP reshards). Like `save_checkpoint`, it is built in a hidden
    directory and renamed: a save killed on any rank never becomes `latest`.

    Args:
        run_dir (Path): the run directory (shared by all ranks).
        step (int): optimizer steps done.
        model (torch.nn.Module): the (sharded) model.
        optimizer (torch.optim.Optimizer): its optimizer.
        state (Dict[str, Any]): this rank's training state; `loader` is gathered from every data rank.
        dist: the `verse.train.distributed.Dist` of the job.
        tokenizer: saved beside the shards when given.
        keep_last (int): keep this many newest step directories (0 = all).
        adapter_base (Optional[str]): for LoRA runs, the base model's path: `dcp/` then holds only the trained
            adapters (and their optimizer state), and rank 0 writes the PEFT adapter, gathered whole, beside it.

    Returns:
        Path: the checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    final, tmp = run_dir / step_dirname(step), run_dir / f".tmp-{step_dirname(step)}"
    adapter = None
    if adapter_base is not None:
        from verse.interop.adapter import adapter_state_dict, save_adapter

        adapter = adapter_state_dict(model)  # every rank takes part in gathering the full tensors
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        if adapter is not None:  # the PEFT adapter, written once: what one process writes
            save_adapter(model, tmp, base=adapter_base, state=adapter)
        else:
            tmp.mkdir(parents=True)
    dist.barrier()
    options = StateDictOptions(ignore_frozen_params=adapter_base is not None)  # the base is in `adapter_base`
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    loaders = dist.gather_object(state.get("loader"), group="dp")
    if dist.is_main:
        (tmp / DCP_DIR / ARGS_FILE).write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_state({**state, "optimizer": {"in": DCP_DIR}, "loader": None, "loaders": loaders}, tmp / STATE_DIR)
        _publish_step(run_dir, tmp, final, keep_last)
    dist.barrier()
    return final


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete `step-*` directories of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob("step-*") if p.is_dir() and (p / STATE_DIR / "state.json").is_file())


def clean_partial(run_dir: Path) -> None:
    """Remove the temporary directories a killed run left behind, and put back a step a killed re-save had moved
    aside (when its replacement never landed)."""
    run_dir = Path(run_dir)
    # the step being written, and the model writer's own staging directory beside it (`publish.staged`)
    for tmp in (*run_dir.glob(".tmp-step-*"), *run_dir.glob("..tmp-step-*.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
    for aside in run_dir.glob(".step-*.old-*"):  # where `publish` (without renameat2) moves a step aside
        final = run_dir / aside.name[1:].split(".old-")[0]
        if (aside / "old").is_dir() and not final.exists():
            os.rename(aside / "old", final)
        shutil.rmtree(aside, ignore_errors=True)


# ---- run directories ----

def is_run_dir(path: Path) -> bool:
    """Whether `path` is a run directory `verse train` created (it holds the marker)."""
    return (Path(path) / RUN_MARKER).is_file()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run directory training must not write into; reads only, so a refusal leaves the disk as it was.

    A new run needs a new or empty directory; `--resume` needs a run directory (marked, or an unmarked one from
    before the marker with config.yaml and a complete checkpoint).

    Args:
        run_dir (Path): the `out_dir` (or `--resume` directory).
        resume (bool): whether the run continues.

    Raises:
        ConfigError: one line saying what is wrong and what to do.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out_dir={run_dir}: exists and is not a directory; give a new directory for the run")
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {run_dir}: no such run directory")
        legacy = (run_dir / CONFIG_FILE).is_file() and bool(list_checkpoints(run_dir))
        if not is_run_dir(run_dir) and not legacy:
            raise ConfigError(f"--resume {run_dir}: not a run directory of `verse train` (no {RUN_MARKER})")
    elif is_run_dir(run_dir):
        raise ConfigError(f"out_dir={run_dir} is a training run already: continue it with "
                          f"`verse train --resume {run_dir}`, or choose a new out_dir")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        names = sorted(p.name for p in run_dir.iterdir())
        raise ConfigError(f"out_dir={run_dir} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                          f") and not a training run: choose a new directory (or `verse train --resume DIR` to "
                          f"continue a run)")
    else:
        ancestor = run_dir.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"out_dir={run_dir}: cannot be created ({ancestor} is "
                              f"{'not a directory' if not ancestor.is_dir() else 'not writable'}); "
                              "give a new directory for the run")
    latest = run_dir / LATEST
    if latest.exists() and not latest.is_symlink():
        raise ConfigError(f"{latest}: is not the `latest` link of the run but a "
                          f"{'directory' if latest.is_dir() else 'file'} of yours; move it out of the run directory")


def create_run_dir(run_dir: Path) -> None:
    """Create (or mark the empty) directory `run_dir` as a training run directory.

    Raises:
        ConfigError: when the directory cannot be created.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RUN_MARKER}.tmp"
        tmp.write_text(json.dumps({"created_by": "verse train"}) + "\n")
        os.replace(tmp, run_dir / RUN_MARKER)
    except OSError as e:
        raise ConfigError(f"out_dir={run_dir}: cannot create the run directory ({e.strerror})") from None


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
            raise CheckpointError(f"{run_dir}: no complete step-* checkpoint to resume from (the run stopped "
                                  "before its first save); start it again in a new out_dir")
        target = found[-1]
    try:
        step = int(target.name.split("-")[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{target}: not a step-NNNNNNN checkpoint directory") from None
    return target, step
