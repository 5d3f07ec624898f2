"""DeepSeek FP8 checkpoints to BF16 (after DeepSeek-V3 inference/fp8_cast_bf16.py), one shard at a time.

An FP8 checkpoint stores each quantized weight `X.weight` as float8_e4m3fn with its float32 block scales
`X.weight_scale_inv` [ceil(out/128), ceil(in/128)] (possibly in another shard). The output keeps the shard
layout, holds the dequantized weights in BF16, drops the scales, rewrites the index, and copies the other
files (config.json without its `quantization_config`).
"""

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from verse.errors import CheckpointError, ConfigError
from verse.fp8 import BLOCK_SIZE, weight_dequant
from verse.jsonio import read_json
from verse.publish import check_destination, check_distinct, staged

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # `X.weight` is scaled by `X.weight_scale_inv`
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")  # their names in safetensors headers


@dataclass
class CastSummary:
    """What `fp8_to_bf16` wrote."""

    dst: Path
    shards: int
    tensors: int
    dequantized: int
    total_bytes: int
    skipped: list[str] = field(default_factory=list)  # files not copied: they link outside the source


def read_weight_map(src: Path) -> Dict[str, str]:
    """Tensor name -> shard file name, from `model.safetensors.index.json` or a single `model.safetensors`.

    Every listed shard must exist, and every `*.safetensors` file in `src` must be listed.

    Args:
        src (Path): checkpoint directory.

    Returns:
        Dict[str, str]: the weight map.
    """
    index = src / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index}: tensor {tensor} points to {shard!r}, not a file name in {src}")
            if not (src / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} (holding {tensor}) is missing from {src}")
        unlisted = sorted({p.name for p in src.glob("*.safetensors")} - set(weight_map.values()))
        if unlisted:
            raise CheckpointError(f"{src / unlisted[0]}: shard is not listed in {index}; fix or regenerate the index")
        return weight_map
    if (src / SINGLE_NAME).is_file():
        with _open(src / SINGLE_NAME, "cpu") as f:
            return {name: SINGLE_NAME for name in f.keys()}
    raise CheckpointError(f"{src}: no {INDEX_NAME} or {SINGLE_NAME}; expected a safetensors checkpoint directory")


def _open(path: Path, device: str):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_shards(src: Path, weight_map: Dict[str, str], handle: Callable[[str], Any]) -> None:
    """Before writing anything, check from the shard headers alone that every listed tensor is stored where the
    index says, and that every FP8 tensor is 2-D with a `*_scale_inv` of the block shape.

    Args:
        src (Path): checkpoint directory.
        weight_map (Dict[str, str]): tensor name -> shard file name.
        handle (Callable[[str], Any]): shard file name -> open `safe_open` handle.
    """
    for shard in sorted(set(weight_map.values())):
        f = handle(shard)
        stored = set(f.keys())
        for name in sorted(n for n, s in weight_map.items() if s == shard):
            if name not in stored:
                raise CheckpointError(f"{src / shard}: tensor {name} is listed in the index but not stored here")
            header = f.get_slice(name)
            if header.get_dtype() not in FP8_HEADER_DTYPES:
                continue
            shape, scale_name = header.get_shape(), name + SCALE_SUFFIX
            if scale_name not in weight_map:
                raise CheckpointError(f"{src / shard}: FP8 tensor {name} has no {scale_name}; cannot dequantize")
            scale_shape = handle(weight_map[scale_name]).get_slice(scale_name).get_shape()
            expected = [-(-shape[0] // BLOCK_SIZE), -(-shape[1] // BLOCK_SIZE)] if len(shape) == 2 else None
            if list(scale_shape) != expected:
                raise CheckpointError(f"{src / weight_map[scale_name]}: {scale_name} has shape {list(scale_shape)}, "
                                      f"but FP8 tensor {name} {list(shape)} needs {expected} "
                                      f"({BLOCK_SIZE}x{BLOCK_SIZE} blocks of a 2-D weight)")


def _allowed_roots(src: Path) -> list[Path]:
    """Where the files of `src` may really live: inside it, and for a Hugging Face cache snapshot
    (`models--ORG--NAME/snapshots/REV`, whose files link to `../../blobs/SHA`) in that repository's `blobs/`."""
    root = src.resolve()
    return [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]


def _copy_other_files(src: Path, dst: Path, dtype: torch.dtype) -> list[str]:
    """Copy the non-weight files of `src` to `dst` (config.json without its quantization_config).

    A file whose real path lies outside `src` (a symbolic link such as `README.md -> ~/.ssh/id_rsa`) is not
    copied: its content is no part of the checkpoint.

    Returns:
        list[str]: the names of the files skipped for that reason.
    """
    roots, skipped = _allowed_roots(src), []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.suffix == ".safetensors" or path.name == INDEX_NAME:
            continue
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            skipped.append(path.name)
            continue
        if path.name == "config.json":
            config = read_json(path)
            config.pop("quantization_config", None)
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
            (dst / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(real, dst / path.name)
    return skipped


def fp8_to_bf16(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                progress: bool = True, overwrite: bool = False) -> CastSummary:
    """Convert an FP8 block-quantized checkpoint directory to `dtype`, holding at most one shard in memory.

    Args:
        src (str | Path): FP8 checkpoint (sharded safetensors + index, or one model.safetensors).
        dst (str | Path): new or empty directory (or any, with `overwrite`); written beside it first, then
            published atomically (`verse.publish`): on any error `dst` stays as it was.
        dtype (torch.dtype): dtype of the dequantized weights.
        device (str): where to dequantize ("cuda" uses the Triton kernel).
        progress (bool): show a progress bar over shards.
        overwrite (bool): replace a non-empty `dst` whole.

    Returns:
        CastSummary: shards, tensors and bytes written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    check_distinct(src, dst)
    dst = check_destination(dst, overwrite=overwrite)
    if not (device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())):
        raise ConfigError(f"device {device!r}: use cpu, or cuda on a machine with a CUDA GPU")
    weight_map = read_weight_map(src)
    for name in weight_map:
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) not in weight_map:
            raise CheckpointError(f"{src / weight_map[name]}: scale {name} has no weight "
                                  f"{name.removesuffix(SCALE_SUFFIX)} in the checkpoint")
    shards = sorted(set(weight_map.values()))
    new_map: Dict[str, str] = {}
    total_bytes = dequantized = 0
    with staged(dst, replace=overwrite) as tmp, contextlib.ExitStack() as stack:
        handles = {}

        def handle(shard: str):
            if shard not in handles:
                handles[shard] = stack.enter_context(_open(src / shard, device))
            return handles[shard]

        check_shards(src, weight_map, handle)
        for shard in tqdm(shards, desc="fp8-to-bf16", unit="shard", disable=not progress):
            f = handle(shard)
            out: Dict[str, torch.Tensor] = {}
            for name in sorted(n for n, s in weight_map.items() if s == shard and not n.endswith(SCALE_SUFFIX)):
                tensor = f.get_tensor(name)
                if tensor.dtype in FP8_DTYPES:
                    scale_name = name + SCALE_SUFFIX
                    tensor = weight_dequant(tensor, handle(weight_map[scale_name]).get_tensor(scale_name),
                                            dtype=dtype)
                    dequantized += 1
                out[name] = tensor.cpu()
                new_map[name] = shard
                total_bytes += tensor.numel() * tensor.element_size()
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
            del out
        if (src / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(new_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        skipped = _copy_other_files(src, tmp, dtype)
    return CastSummary(dst, len(shards), len(new_map), dequantized, total_bytes, skipped)
