"""`verse.load`: recognise a Verse/Hugging Face checkpoint directory, a Hub id or a `.gguf` file, and build the model.

Models are built on the `meta` device and the loaded tensors are assigned in place, so a 7B model is
never materialised twice.
"""

import logging
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

from verse.config import ModelArgs, dtype_name
from verse.errors import CheckpointError, ConfigError
from verse.interop.dcp import is_sharded, load_sharded_model
from verse.model import ReasoningLLM
from verse.model.transformer import torch_dtype
from verse.model.linear import fp8_layers, quantize_

# ModelArgs fields that change how a model runs, not its weights: the only ones `verse.load` overrides.
EXECUTION_FIELDS = ("attn_impl", "gemm_impl", "checkpointing", "checkpoint_every", "max_seq_len")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")  # HF/Verse "layers.N." and GGUF "blk.N."
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")

log = logging.getLogger("verse.load")


def resolve_dtype(dtype: Optional[torch.dtype | str]) -> Optional[torch.dtype]:
    """torch.float32 / "float32" / "fp32" / "f32" -> torch.float32 (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype_name(str(dtype).removeprefix("torch."))  # rejects the dtypes parameters are never stored in
        return dtype
    return torch_dtype(dtype_name(dtype))


def check_overrides(overrides: Dict[str, Any]) -> None:
    """Reject overrides that would change the weights (only `EXECUTION_FIELDS` may change at load time)."""
    bad = sorted(set(overrides) - set(EXECUTION_FIELDS))
    if bad:
        raise ConfigError(f"verse.load cannot override {', '.join(bad)}: only execution fields "
                          f"({', '.join(EXECUTION_FIELDS)}) may change at load time; pass dtype= for the dtype")


def is_hub_id(path: Path) -> bool:
    """Whether a path that does not exist reads as a Hugging Face Hub repo id ("org/name")."""
    return (not path.is_absolute() and bool(HUB_ID.fullmatch(str(path))) and not str(path).startswith(".")
            and path.suffix.lower() != ".gguf")


def checkpoint_dir(path: Path) -> Path:
    """The checkpoint a directory stands for: itself, or for a training run directory (no config.json or
    verse.json of its own, a `latest` checkpoint inside) its newest checkpoint. Models and tokenizers both use it.

    Args:
        path (Path): a checkpoint or training run directory.

    Returns:
        Path: the checkpoint directory.
    """
    is_checkpoint = any((path / name).is_file() for name in ("config.json", "verse.json"))
    return path / "latest" if not is_checkpoint and (path / "latest").is_dir() else path


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype | str] = None,
               **overrides: Any) -> ReasoningLLM:
    """Load a Verse checkpoint directory, a Hugging Face Llama/Mistral/Qwen/DeepSeek directory or Hub id, a `.gguf`,
    or a directory of model-parallel shards (`verse convert --model-parallel N`: the ranks are gathered into one model).

    Args:
        path (str | Path): checkpoint directory (or a training run directory: its `latest` checkpoint), `.gguf`
            file, or Hub repo id ("org/name").
        device (torch.device | str): where the weights go.
        dtype (Optional[torch.dtype | str]): parameter dtype; None keeps the file's own (quantized GGUF -> bfloat16).
        **overrides: execution-only `ModelArgs` fields (`EXECUTION_FIELDS`).

    Returns:
        ReasoningLLM: the model in eval mode. With `gemm_impl="fp8"` and a checkpoint without FP8 weights, its
        linear layers are quantized to FP8 on load (a warning says so): FP8 GEMMs need FP8 weights.
    """
    model = _load_model(path, device, dtype, overrides)
    if overrides.get("gemm_impl") == "fp8" and not any(getattr(m, "is_fp8", False) for m in model.modules()):
        log.warning("%s holds no FP8 weights: its linear layers were quantized to FP8 (128x128 block scales) on load "
                    "for gemm_impl='fp8'", path)
        quantize_(model)
    return model


def _load_model(path: str | Path, device: torch.device | str, dtype: Optional[torch.dtype | str],
                overrides: Dict[str, Any]) -> ReasoningLLM:
    check_overrides(overrides)
    dtype = resolve_dtype(dtype)
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from verse.interop.gguf import load_gguf

        return load_gguf(path, device=device, dtype=dtype, **overrides)
    if overrides.get("gemm_impl") == "gguf":
        raise ConfigError(f"gemm_impl='gguf' keeps the quantized blocks of a .gguf file, and {path} is not one; "
                          f"use gemm_impl='bf16'")
    from verse.interop.hf import download, load_hf

    if path.is_dir():
        from verse.interop.parallel import is_model_parallel, load_parallel_model

        path = checkpoint_dir(path)
        if _is_adapter_dir(path):
            return _load_with_adapter(path, device, dtype, overrides)
        if is_model_parallel(path):
            return load_parallel_model(path, device=device, dtype=dtype, **overrides)
        if is_sharded(path):  # written by several ranks (DCP shards): gathered here
            return load_sharded_model(path, device=device, dtype=dtype, **overrides)
        return load_hf(path, device=device, dtype=dtype, **overrides)
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    if is_hub_id(path):
        return load_hf(download(str(path)), device=device, dtype=dtype, **overrides)
    raise CheckpointError(f"{path}: no such file or directory; give a checkpoint directory, a .gguf file or a Hub id")


def _load_with_adapter(path: Path, device: torch.device | str, dtype: Optional[torch.dtype],
                       overrides: Dict[str, Any]) -> ReasoningLLM:
    """A PEFT adapter directory (e.g. a LoRA run's checkpoint): its base (`base_model_name_or_path`), then the
    adapter on top, unmerged."""
    from verse.interop.adapter import load_adapter

    model = load_model(_adapter_base(path), device=device, dtype=dtype, **overrides)
    return load_adapter(model, path).eval()


def _is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory without a model of its own."""
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _adapter_base(path: Path) -> str:
    """The base model a PEFT adapter directory names (`base_model_name_or_path`)."""
    from verse.interop.adapter import read_adapter_config

    _, config = read_adapter_config(path)
    base = config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{path}: a LoRA adapter without base_model_name_or_path; load its base and pass "
                              f"--adapter {path}")
    return base


def load_args(path: str | Path) -> ModelArgs:
    """The `ModelArgs` that `load_model(path)` builds, read from the configuration alone (no weight is read).

    Args:
        path (str | Path): anything `load_model` accepts: a Verse or Hugging Face checkpoint directory (with or
            without verse.json; DeepSeek and FP8 layouts too), a training run directory, an adapter directory (its
            base's configuration), a `.gguf` file (its metadata), or a Hub repo id (only its JSON files are fetched).

    Returns:
        ModelArgs: the configuration (its `dtype` is the default; the weights' dtype needs the weights).
    """
    from verse.interop.hf import download, read_args

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from verse.interop.gguf import args_from_gguf

        return args_from_gguf(path)
    if path.is_dir():
        path = checkpoint_dir(path)
        if _is_adapter_dir(path):
            return load_args(_adapter_base(path))
        return read_args(path)[0]
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    if is_hub_id(path):
        return read_args(download(str(path), patterns=["*.json"]))[0]
    raise CheckpointError(f"{path}: no such file or directory; give a checkpoint directory, a .gguf file or a Hub id")


def check_weights_fit(args: ModelArgs, names: Iterable[str], embed_shape: Optional[Sequence[int]],
                      source: str | Path, n_experts: Optional[int] = None) -> None:
    """Check a config against the tensors a file holds (names and the embedding's shape, read from headers) BEFORE
    the model is built, so a config claiming a million layers or experts fails at once instead of building them.

    Args:
        args (ModelArgs): the configuration read from the file.
        names (Iterable[str]): every tensor name in the file(s), in the file's own naming (HF or GGUF).
        embed_shape (Optional[Sequence[int]]): the token embedding's [vocab, dim] (None: missing).
        source (str | Path): the file or directory (named in errors).
        n_experts (Optional[int]): experts per layer of a file that stacks them in one tensor (GGUF's
            `ffn_*_exps`); None counts the `experts.N.` tensor names.
    """
    layers, experts = set(), set()
    for name in names:
        if match := LAYER_INDEX.search(name):
            layers.add(int(match.group(1)))
        if match := EXPERT_INDEX.search(name):
            experts.add(int(match.group(1)))
    if embed_shape is None:
        raise CheckpointError(f"{source}: the token embedding tensor is missing")
    if list(embed_shape) != [args.vocab_size, args.dim]:
        raise CheckpointError(f"{source}: the token embedding is {list(embed_shape)} but the config says vocab_size "
                              f"{args.vocab_size} x dim {args.dim}; the file does not match its config")
    missing = [i for i in range(min(args.n_layers, max(layers, default=-1) + 2)) if i not in layers]
    if missing:
        raise CheckpointError(f"{source}: the config says {args.n_layers} layers but the weights hold "
                              f"{len([i for i in layers if i < args.n_layers])} (layer {missing[0]} is missing)")
    held = len(experts) if n_experts is None else n_experts
    if any(map(args.is_moe_layer, range(args.n_layers))) and args.n_routed_experts > held:
        raise CheckpointError(f"{source}: the config says {args.n_routed_experts} routed experts but the weights "
                              f"hold {held}; the file does not match its config")


def build_model(args: ModelArgs, state_dict: Dict[str, torch.Tensor], source: str | Path,
                device: torch.device | str = "cpu", ggml_types: Optional[Dict[str, int]] = None) -> ReasoningLLM:
    """Build a `ReasoningLLM` on `meta` and assign `state_dict` (Verse names) to it, checking names and shapes.

    Args:
        args (ModelArgs): configuration (its `dtype` is the parameters' dtype).
        state_dict (Dict[str, torch.Tensor]): every weight, already in Verse names.
        source (str | Path): the file or directory the weights came from (named in errors).
        device (torch.device | str): where the weights go.
        ggml_types (Optional[Dict[str, int]]): GGML type of each uint8 (GGUF blocks) weight; None = told from
            the row size (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 only).

    Returns:
        ReasoningLLM: the model in eval mode, RoPE tables computed, tied weights shared.
    """
    with torch.device("meta"):
        model = ReasoningLLM(args)
    quantize_(model, fp8_layers(state_dict))  # FP8 checkpoints: those layers take float8 weights + block scales
    for name, tensor in state_dict.items():  # gemm_impl="gguf": those layers take the file's blocks
        if tensor.dtype == torch.uint8 and name.endswith(".weight"):
            try:
                model.get_submodule(name.removesuffix(".weight")).ggml_(tensor.size(-1), (ggml_types or {}).get(name))
            except ValueError as e:  # the rows do not hold the config's number of input features
                raise CheckpointError(f"{source}: tensor {name}: {e}; the file does not match its config") from None
    # a head in GGUF blocks is its own tensor even when tied (the embedding lookup needs the dense table)
    tied = args.tie_embeddings and model.head.ggml_type is None
    expected = model.state_dict()
    if tied:
        expected.pop("head.weight", None)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; the file does not match its config")
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]} for this config")
    for name, target in expected.items():
        tensor = state_dict[name]
        if tensor.shape != target.shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                                  f"expected {list(target.shape)} from the config")
        if tensor.dtype != target.dtype or tensor.device != torch.device(device):
            state_dict[name] = tensor.to(device=device, dtype=target.dtype)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.head.weight = model.embed.weight
    model.reset_buffers()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{source}: tensor {left[0]} was not loaded")
    return model.eval()
