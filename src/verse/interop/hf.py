"""The Hugging Face checkpoint directory: read and write config.json, safetensors (sharded), verse.json, tokenizer.

The architecture-specific parts live in adapters picked by HF `model_type`: `verse.interop.llama` (llama,
mistral), `verse.interop.qwen` (qwen2, qwen3, qwen3_moe) and `verse.interop.deepseek` (deepseek_v2, deepseek_v3).
Each exposes `args_from_hf(config)`, `hf_config(args)`, `to_verse(state_dict, args)` and `to_hf(state_dict, args)`.
"""

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from verse.config import ModelArgs, check_type
from verse.errors import CheckpointError, ConfigError
from verse.interop.load import build_model, check_weights_fit
from verse.jsonio import read_json
from verse.model import ReasoningLLM
from verse.publish import check_destination, staged

ADAPTERS = {"llama": "verse.interop.llama", "mistral": "verse.interop.llama", "qwen2": "verse.interop.qwen",
            "qwen3": "verse.interop.qwen", "qwen3_moe": "verse.interop.qwen",
            "deepseek_v2": "verse.interop.deepseek", "deepseek_v3": "verse.interop.deepseek"}
CONFIG = "config.json"
VERSE_CONFIG = "verse.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LOADABLE_DTYPES = (*SAFETENSORS_DTYPES, "F8_E4M3")  # float8: DeepSeek FP8 weights (with float32 block scales)


def adapter_for(model_type: str, source: str | Path) -> ModuleType:
    """The adapter module of a Hugging Face `model_type`.

    Args:
        model_type (str): e.g. "llama", "mistral", "deepseek_v3".
        source (str | Path): where the model type was read (named in errors).

    Returns:
        ModuleType: the adapter (`args_from_hf`, `hf_config`, `to_verse`, `to_hf`).
    """
    module = ADAPTERS.get(model_type)
    if module is None:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(ADAPTERS)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported by this Verse build") from None


def download(repo_id: str, patterns: Sequence[str] = ("*.json", "*.safetensors", "tokenizer*")) -> Path:
    """Download a model from the Hugging Face Hub (config, safetensors, tokenizer files) into the local cache.

    Args:
        repo_id (str): "org/name".
        patterns (Sequence[str]): the files to fetch (`("*.json",)`: the configuration only).

    Returns:
        Path: the local snapshot directory.
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:  # network, auth, missing repo: all one user-facing line
        raise CheckpointError(f"{repo_id}: not a local path, and downloading it from the Hugging Face Hub failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_args(path: Path) -> tuple[ModelArgs, ModuleType]:
    """The `ModelArgs` of a checkpoint directory and its adapter: verse.json when present, else config.json.

    Args:
        path (Path): the checkpoint directory.

    Returns:
        tuple[ModelArgs, ModuleType]: configuration and adapter.
    """
    verse_json = path / VERSE_CONFIG
    if verse_json.is_file():
        try:
            args = ModelArgs.from_dict(read_json(verse_json), str(verse_json))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{verse_json}: {e}") from None
        return args, adapter_for(args.arch, verse_json)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG} or {VERSE_CONFIG}; not a Hugging Face or Verse checkpoint")
    config = read_json(config_path)
    if "model_type" not in config:
        raise CheckpointError(f"{config_path}: missing field 'model_type'")
    if not isinstance(config["model_type"], str):
        raise CheckpointError(f"{config_path}: field 'model_type' must be a string, got {config['model_type']!r:.40}")
    adapter = adapter_for(config["model_type"], config_path)
    hf_names = getattr(adapter, "HF_FIELDS", {})
    try:
        for name, key in hf_names.items():
            if config.get(key) is not None and key != "eos_token_id":  # eos may be a list: checked once chosen
                check_type(name, config[key], f"field {key!r}")
        return adapter.args_from_hf(config), adapter
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing field {e.args[0]!r}") from None
    except ConfigError as e:
        key = hf_names.get(e.field)
        raise CheckpointError(f"{config_path}: {e}" + (f" (config.json field {key!r})" if key and key not in str(e)
                                                        else "")) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid value ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards of the index, or model.safetensors."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing field 'weight_map'")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if file.parent != path:
                raise CheckpointError(f"{index}: shard {file.name!r} lies outside the checkpoint directory")
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {WEIGHTS_INDEX} is missing")
        return files
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; Verse reads safetensors only "
                              f"(re-save with safe_serialization=True)")
    raise CheckpointError(f"{path}: no {WEIGHTS} or {WEIGHTS_INDEX}")


def tensor_headers(files: list[Path]) -> Dict[str, tuple[str, list[int]]]:
    """Name -> (safetensors dtype, shape) of every tensor, from the files' headers alone (no tensor is read).

    Raises `CheckpointError` for a dtype Verse cannot load (e.g. U8 or I64 weights).
    """
    headers: Dict[str, tuple[str, list[int]]] = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                info = f.get_slice(name)
                dtype = info.get_dtype()
                if dtype not in LOADABLE_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, which Verse cannot load "
                                          f"(supported: {', '.join(LOADABLE_DTYPES)})")
                headers[name] = (dtype, list(info.get_shape()))
    return headers


def file_dtype(headers: Dict[str, tuple[str, list[int]]]) -> torch.dtype:
    """The dtype most tensors of the checkpoint have (float8 weights count as bfloat16), from `tensor_headers`."""
    counts: Dict[torch.dtype, int] = {}
    for dtype, _ in headers.values():
        dtype = SAFETENSORS_DTYPES.get(dtype, torch.bfloat16)
        counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.bfloat16


def _open(file: Path, device: str = "cpu"):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


# tensors the model keeps in float32 whatever its dtype: FP8 block scales and the DeepSeek-V3 routing bias
FLOAT32_TENSORS = ("weight_scale_inv", "e_score_correction_bias")
# config.json's note of FP8 weights with 128x128 block scales (`NAME.weight_scale_inv`), as in DeepSeek-V3's
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}


def read_safetensors(files: list[Path], device: torch.device | str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Read every tensor, casting floating-point ones (not float8, not `FLOAT32_TENSORS`) to `dtype` one at a time.

    Args:
        files (list[Path]): safetensors files.
        device (torch.device | str): where the tensors go.
        dtype (torch.dtype): target dtype of float32/float16/bfloat16 tensors.

    Returns:
        Dict[str, torch.Tensor]: name -> tensor.
    """
    state: Dict[str, torch.Tensor] = {}
    with tqdm(desc="loading", unit="tensor", disable=None, leave=False) as bar:
        for file in files:
            with _open(file, str(device)) as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None
                    keep = name.endswith(FLOAT32_TENSORS) or tensor.dtype not in SAFETENSORS_DTYPES.values()
                    state[name] = tensor if keep else tensor.to(dtype)
                    bar.update()
    return state


def load_into(model: ReasoningLLM, path: Path) -> None:
    """Copy the weights of the checkpoint directory `path` into `model`'s own tensors, one layer at a time.

    The file's tensors are memory-mapped views, converted (`to_verse`) a layer at a time and copied into the
    parameters in place (cast to their dtype), so resuming a run holds the model once, as a fresh start does.

    Args:
        model (ReasoningLLM): a model of the checkpoint's architecture (e.g. built from the same config).
        path (Path): the checkpoint directory.

    Raises:
        CheckpointError: a tensor that is missing, unexpected, unreadable or of the wrong shape.
    """
    adapter = adapter_for(model.args.arch, path)
    target = model.state_dict()
    if model.args.tie_embeddings:
        target.pop("head.weight", None)  # the embedding's own tensor
    groups: Dict[Optional[str], Dict[str, Path]] = {}  # layer index (None: embedding, norm, head) -> tensors
    for file in weight_files(path):
        with _open(file) as f:
            for name in f.keys():
                parts = name.split(".")
                layer = parts[2] if name.startswith("model.layers.") and len(parts) > 3 else None
                groups.setdefault(layer, {})[name] = file
    loaded = set()
    for names in groups.values():
        tensors = {}
        for file in dict.fromkeys(names.values()):
            with _open(file) as f:
                for name in (n for n, where in names.items() if where == file):
                    try:
                        tensors[name] = f.get_tensor(name)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None
        try:
            state = adapter.to_verse(tensors, model.args)
        except KeyError as e:
            raise CheckpointError(f"{path}: unexpected tensor {e.args[0]} for model_type {model.args.arch!r}") from None
        del tensors
        with torch.no_grad():
            for name, tensor in state.items():
                if name not in target:
                    raise CheckpointError(f"{path}: unexpected tensor {name} for this model")
                if tensor.shape != target[name].shape:
                    raise CheckpointError(f"{path}: tensor {name} has shape {list(tensor.shape)}, expected "
                                          f"{list(target[name].shape)}")
                target[name].copy_(tensor)
                loaded.add(name)
        del state  # before the next layer's tensors are mapped
    missing = [name for name in target if name not in loaded]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def load_hf(path: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
            **overrides: Any) -> ReasoningLLM:
    """Load a Verse or Hugging Face checkpoint directory.

    Args:
        path (Path): directory with config.json (or verse.json) and safetensors weights.
        device (torch.device | str): where the weights go.
        dtype (Optional[torch.dtype]): parameter dtype; None = the file's.
        **overrides: execution-only `ModelArgs` fields.

    Returns:
        ReasoningLLM: the model in eval mode.
    """
    args, adapter = read_args(path)
    files = weight_files(path)
    headers = tensor_headers(files)
    embed = headers.get(adapter.GLOBAL_NAMES["embed.weight"])
    check_weights_fit(args, headers, embed and embed[1], files[0] if len(files) == 1 else path)
    dtype = dtype or file_dtype(headers)
    args = args.replace(dtype=str(dtype).removeprefix("torch."), **overrides)
    state = read_safetensors(files, device, dtype)
    try:
        state = adapter.to_verse(state, args)
    except KeyError as e:
        raise CheckpointError(f"{path}: unexpected tensor {e.args[0]} for model_type {args.arch!r}") from None
    return build_model(args, state, files[0] if len(files) == 1 else path, device)


# names a checkpoint re-save replaces in an existing checkpoint directory (besides the files it writes)
OWN_NAMES = (WEIGHTS, WEIGHTS_INDEX, CONFIG, VERSE_CONFIG, GENERATION_CONFIG)
OWN_PATTERNS = ("model-*-of-*.safetensors", "model*-mp*.safetensors")
TRAIN_STATE = "train_state"  # a training step's state (verse.train.checkpoint.STATE_DIR; train imports interop)


def is_checkpoint(path: Path) -> bool:
    """Whether a directory is a Verse or Hugging Face checkpoint: it has config.json, verse.json, safetensors
    weights of the checkpoint's names, or a training step's `train_state/`."""
    return (any((path / name).is_file() for name in OWN_NAMES) or (path / TRAIN_STATE).is_dir()
            or any(any(path.glob(pattern)) for pattern in OWN_PATTERNS))


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """Validate the output directory of `save_pretrained` (see there for the rule); create its parent."""
    target = Path(path).expanduser()
    resave = target.is_dir() and not target.is_symlink() and is_checkpoint(target)
    return check_destination(target, overwrite=overwrite or resave)


def _kept_entries(target: Path) -> list[str]:
    """The entries of an existing checkpoint directory a re-save keeps: all but the checkpoint's own files."""
    kept = []
    for entry in sorted(target.iterdir()):
        if entry.name in OWN_NAMES or any(entry.match(p) for p in OWN_PATTERNS):
            if entry.is_dir() and not entry.is_symlink():
                raise CheckpointError(f"{entry}: a directory where the checkpoint has a file; move it away, "
                                      f"or pass overwrite=True to replace the whole directory")
            continue
        kept.append(entry.name)
    return kept


def save_pretrained(model: ReasoningLLM, path: str | Path, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Write the checkpoint directory of DESIGN.md, loadable by `verse.load` and transformers.

    config.json (HF architecture), model.safetensors (or model-0000i-of-0000n.safetensors shards + index above
    `max_shard_bytes`), generation_config.json, verse.json (full `ModelArgs`) and, when given, the tokenizer
    files. Everything is written to a temporary directory beside `path` first and published in one atomic step
    (`verse.publish`), so a crash or error never leaves a half checkpoint and `path` stays as it was.

    `path` may be new or an empty directory, or an existing Verse/Hugging Face checkpoint (`is_checkpoint`): that
    is re-saved, its weights, configs and tokenizer replaced and its other entries (e.g. a
    training run's `train_state/`) kept. Any other non-empty directory is refused unless `overwrite`, which
    replaces the whole directory.

    Args:
        model (ReasoningLLM): the model.
        path (str | Path): target directory.
        tokenizer: optional Verse tokenizer (its `save_pretrained(dir)` writes tokenizer.json + config).
        max_shard_bytes (int): largest shard size in bytes.
        overwrite (bool): replace a non-empty `path` whole, whatever it holds.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    if any(getattr(m, "ggml_type", None) is not None for m in model.modules()):
        raise CheckpointError(f"{path}: this model holds GGUF blocks (gemm_impl='gguf'), which a Hugging Face "
                              f"checkpoint cannot store; load it with gemm_impl='bf16' to save it")
    target = check_target(path, overwrite)
    args = model.args
    dtype = model.embed.weight.dtype
    args = dataclasses.replace(args, dtype=str(dtype).removeprefix("torch."))
    adapter = adapter_for(args.arch, VERSE_CONFIG)
    config = adapter.hf_config(args)  # first: it refuses what the family cannot hold, before any tensor moves
    state = adapter.to_hf(model.state_dict(), args)
    config["torch_dtype"] = config["dtype"] = args.dtype
    if any(getattr(m, "is_fp8", False) for m in model.modules()):  # FP8 layers: stored as DeepSeek-V3 stores them
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    generation = {k: v for k, v in (("bos_token_id", args.bos_token_id), ("eos_token_id", args.eos_token_id))
                  if v is not None}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    replace = overwrite or (target.is_dir() and any(target.iterdir()))
    keep = [] if overwrite or not target.is_dir() else _kept_entries(target)
    with staged(target, replace=replace, keep=keep) as tmp:
        for filename, names in tqdm(split.filename_to_tensors.items(), desc="saving", unit="file", disable=None,
                                    leave=False):
            save_file({name: state[name].contiguous() for name in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": split.metadata.get("total_size")},
                     "weight_map": split.tensor_to_filename}
            (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / VERSE_CONFIG).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

