"""Checkpoints of several ranks (`verse.train.checkpoint.save_sharded`) read in one process.

Such a step directory holds `dcp/`: the model and optimizer shards in torch.distributed.checkpoint (DCP) files
and `verse.json`, the `ModelArgs` to rebuild the model. DCP reshards on load, so the same files resume a run on
any number of ranks or give `verse.load` / `verse convert` the full model here.
"""

from pathlib import Path
from typing import Any, Optional

import torch

from verse.config import ModelArgs
from verse.errors import CheckpointError
from verse.jsonio import read_json
from verse.model import ReasoningLLM

DCP_DIR = "dcp"  # a checkpoint of several ranks: model + optimizer shards (torch.distributed.checkpoint)
ARGS_FILE = "verse.json"  # inside DCP_DIR: the ModelArgs to rebuild the model


def is_sharded(step_dir: Path) -> bool:
    """Whether a step directory was written by `save_sharded`."""
    return (Path(step_dir) / DCP_DIR / ARGS_FILE).is_file()


def load_sharded(step_dir: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load a `save_sharded` checkpoint into `model` (and `optimizer`), sharded any way or not at all.

    Raises:
        CheckpointError: missing or unreadable shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    from verse.interop.adapter import is_adapter_dir

    # a LoRA run's shards hold only the trained adapters (the base is the run's model)
    options = StateDictOptions(ignore_frozen_params=is_adapter_dir(step_dir), strict=not is_adapter_dir(step_dir))
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    target = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(target, checkpoint_id=str(Path(step_dir) / DCP_DIR), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # DCP wraps reader errors of every rank in its own exception types
        raise CheckpointError(f"{step_dir}: cannot read the sharded checkpoint ({str(e).splitlines()[0][:200]}); "
                              f"resume from an earlier step-*") from None
    if optim_sd is None:
        set_model_state_dict(model, model_sd, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def load_sharded_model(step_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                       **overrides: Any) -> ReasoningLLM:
    """The full model of a `save_sharded` checkpoint, in this one process (what `verse convert` exports).

    Args:
        step_dir (Path): the step directory.
        device (torch.device | str): where the weights go.
        dtype (Optional[torch.dtype]): parameter dtype (None: the run's own).
        **overrides: execution-only `ModelArgs` fields.

    Returns:
        ReasoningLLM: the model in eval mode.
    """
    args = ModelArgs.from_dict(read_json(Path(step_dir) / DCP_DIR / ARGS_FILE), str(step_dir))
    args = args.replace(**overrides) if overrides else args
    with torch.device("meta"):
        model = ReasoningLLM(args)
    model.to_empty(device=device)
    model.reset_buffers()
    load_sharded(step_dir, model)
    if dtype is not None:
        model.to(dtype)
        model.args = args.replace(dtype=str(dtype).removeprefix("torch."))
    return model.eval()
