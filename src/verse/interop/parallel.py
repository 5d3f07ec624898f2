"""Model-parallel shards, as DeepSeek-V3's inference/convert.py writes them: `model{rank}-mp{n}.safetensors`.

Each rank holds 1/n of the attention heads (query/key/value and MLA `wq_b`/`wkv_b` rows, output-projection
columns), of the FFN hidden units (`w1`/`w3` rows, `w2` columns), of the vocabulary (`embed`, `head` rows) and
of the routed experts (rank r keeps experts [r E/n, (r+1) E/n)); norms, the router and MLA's low-rank
down-projections are replicated. FP8 block scales (`*.scale`) are split with their weights, in whole
128-row/column blocks. `verse.json` beside the shards holds the full `ModelArgs`.
"""

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from verse.config import ModelArgs
from verse.errors import CheckpointError, ConfigError
from verse.fp8 import BLOCK_SIZE
from verse.publish import check_destination, staged

VERSE_CONFIG = "verse.json"
SHARD_NAME = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
# module name (the part before `.weight` / `.scale`) -> dimension split across ranks; others are replicated
SPLIT_DIMS = {
    "embed": 0, "head": 0,  # vocabulary
    "wq": 0, "wk": 0, "wv": 0, "wq_b": 0, "wkv_b": 0,  # attention heads (column parallel)
    "wo": 1,  # row parallel
    "w1": 0, "w3": 0, "w2": 1,  # FFN hidden units (dense and shared experts)
    "experts": 0,  # routed experts, stacked [E, ...]
}


def shard_file_name(rank: int, world_size: int) -> str:
    """`model{rank}-mp{world_size}.safetensors`."""
    return f"model{rank}-mp{world_size}.safetensors"


def split_dim(name: str) -> Optional[int]:
    """The dimension of tensor `name` (Verse naming) split across ranks, or None when replicated."""
    module = name.split(".")[-2] if "." in name else name
    return SPLIT_DIMS.get(module)


def check_parallel(args: ModelArgs, world_size: int) -> None:
    """Raise `ConfigError` unless heads, KV heads, routed experts and vocabulary split evenly over the ranks."""
    if world_size < 1:
        raise ConfigError(f"--model-parallel must be a positive number of ranks, got {world_size}")
    counts = {"n_heads": args.n_heads, "n_routed_experts": args.n_routed_experts, "vocab_size": args.vocab_size}
    if args.attention == "gqa":
        counts["n_kv_heads"] = args.n_kv_heads
    for field, count in counts.items():
        if count % world_size:
            raise ConfigError(f"ModelArgs.{field} ({count}) is not divisible by {world_size} model-parallel ranks")


def shard_state_dict(state_dict: Dict[str, torch.Tensor], rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """The part of a full Verse state dict that rank `rank` of `world_size` holds.

    Args:
        state_dict (Dict[str, torch.Tensor]): full weights (Verse names).
        rank (int): this rank.
        world_size (int): number of ranks.

    Returns:
        Dict[str, torch.Tensor]: the rank's tensors (split ones narrowed, replicated ones as they are).
    """
    out = {}
    for name, tensor in state_dict.items():
        dim = split_dim(name)
        if dim is None or world_size == 1:
            out[name] = tensor
            continue
        if name.endswith(".scale"):  # FP8 block scales: split in whole blocks, like their weight
            weight = state_dict[name.removesuffix("scale") + "weight"]
            part, unit = weight.size(dim) // world_size, ("rows", "columns")[dim]
            if part % BLOCK_SIZE:
                raise ConfigError(f"{name}: an FP8 weight split over {world_size} ranks gives {part} {unit} per rank, "
                                  f"not whole {BLOCK_SIZE}-{unit[:-1]} scale blocks; run `verse fp8-to-bf16` first")
            size = part // BLOCK_SIZE
        else:
            if tensor.size(dim) % world_size:
                raise ConfigError(f"{name}: dimension {dim} ({tensor.size(dim)}) is not divisible by "
                                  f"{world_size} model-parallel ranks")
            size = tensor.size(dim) // world_size
        out[name] = tensor.narrow(dim, rank * size, size).contiguous()
    return out


def gather_state_dicts(shards: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Undo `shard_state_dict`: concatenate split tensors of all ranks (in rank order), keep replicated ones.

    Args:
        shards (List[Dict[str, torch.Tensor]]): one state dict per rank.

    Returns:
        Dict[str, torch.Tensor]: the full state dict.
    """
    out = {}
    for name, tensor in shards[0].items():
        dim = split_dim(name)
        out[name] = tensor if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim)
    return out


def save_model_parallel(model, dst: str | Path, world_size: int, tokenizer=None, overwrite: bool = False) -> List[Path]:
    """Write `model` as `world_size` model-parallel shards `model{rank}-mp{world_size}.safetensors` + verse.json.

    Args:
        model (ReasoningLLM): the model (dense or DeepSeek MLA/MoE; FP8 weights keep their scales).
        dst (str | Path): output directory: new or empty, or, with `overwrite`, replaced whole. Written beside
            it first and published atomically (`verse.publish`).
        world_size (int): number of ranks.
        tokenizer: optional Verse tokenizer saved beside the shards.
        overwrite (bool): replace a non-empty `dst`.

    Returns:
        List[Path]: the shard files, in rank order.
    """
    args = model.args.replace(dtype=str(model.embed.weight.dtype).removeprefix("torch."))
    check_parallel(args, world_size)
    dst = check_destination(dst, overwrite=overwrite)
    state = model.state_dict()
    if args.tie_embeddings:
        state.pop("head.weight")  # the same tensor as embed.weight
    with staged(dst, replace=overwrite) as tmp:
        for rank in tqdm(range(world_size), desc="model-parallel shards", unit="rank", disable=None):
            save_file(shard_state_dict(state, rank, world_size), str(tmp / shard_file_name(rank, world_size)),
                      metadata={"format": "pt", "rank": str(rank), "world_size": str(world_size)})
        (tmp / VERSE_CONFIG).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return [dst / shard_file_name(rank, world_size) for rank in range(world_size)]


def shard_files(path: str | Path) -> List[Path]:
    """The model-parallel shard files of `path`, in rank order, checking that all ranks are there."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory of model-parallel shards")
    found = {}
    for file in path.iterdir():
        match = SHARD_NAME.fullmatch(file.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = file
    if not found:
        raise CheckpointError(f"{path}: no model{{rank}}-mp{{n}}.safetensors files; write them with "
                              "`verse convert SRC DST --model-parallel N`")
    if len(found) > 1:
        raise CheckpointError(f"{path}: shards of several world sizes ({', '.join(map(str, sorted(found)))}); "
                              "keep one set")
    world_size, ranks = next(iter(found.items()))
    missing = [rank for rank in range(world_size) if rank not in ranks]
    if missing:
        raise CheckpointError(f"{path / shard_file_name(missing[0], world_size)}: missing; all {world_size} ranks "
                              "are needed")
    extra = sorted(set(ranks) - set(range(world_size)))
    if extra:
        raise CheckpointError(f"{ranks[extra[0]]}: rank {extra[0]} does not exist in a {world_size}-rank model")
    return [ranks[rank] for rank in range(world_size)]


def load_model_parallel(path: str | Path, rank: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Read model-parallel shards back: the full state dict gathered from every rank, or one rank's shard.

    Args:
        path (str | Path): directory written by `save_model_parallel`.
        rank (Optional[int]): return only this rank's tensors; None gathers all ranks.

    Returns:
        Dict[str, torch.Tensor]: Verse names -> tensors (with `head.weight` sharing `embed.weight` when tied).
    """
    files = shard_files(path)
    if rank is not None and not 0 <= rank < len(files):
        raise CheckpointError(f"{path}: rank {rank} out of range for {len(files)} model-parallel shards")
    shards = []
    for file in files if rank is None else [files[rank]]:
        try:
            shards.append(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    names = set(shards[0])
    for file, shard in zip(files, shards):
        if set(shard) != names:
            odd = sorted(names.symmetric_difference(shard))[0]
            raise CheckpointError(f"{file}: tensor {odd} is not in every rank's shard")
    state = shards[0] if rank is not None else gather_state_dicts(shards)
    config = Path(path) / VERSE_CONFIG
    if rank is None and config.is_file() and ModelArgs.from_json(config).tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def is_model_parallel(path: Path) -> bool:
    """Whether a directory holds model-parallel shards and no full-model weights (`verse.load` gathers them)."""
    return (path.is_dir() and any(SHARD_NAME.fullmatch(p.name) for p in path.iterdir())
            and not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")))


def load_parallel_model(path: str | Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                        **overrides: Any):
    """Build the full model from a directory of model-parallel shards (`verse.load` of such a directory).

    Args:
        path (str | Path): directory written by `save_model_parallel` (shards + verse.json).
        device (torch.device | str): where the weights go.
        dtype (Optional[torch.dtype]): parameter dtype; None = the shards'.
        **overrides: execution-only `ModelArgs` fields.

    Returns:
        ReasoningLLM: the model in eval mode, its weights gathered from every rank.
    """
    from verse.interop.load import build_model

    path = Path(path)
    config = path / VERSE_CONFIG
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; model-parallel shards need the {VERSE_CONFIG} written beside them")
    try:
        args = ModelArgs.from_json(config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config}: {e}") from None
    state = load_model_parallel(path)
    if args.tie_embeddings:
        state.pop("head.weight", None)  # build_model ties it to embed.weight
    embed = state.get("embed.weight")
    dtype = dtype or (embed.dtype if embed is not None else torch.float32)  # a missing tensor: build_model says so
    args = args.replace(dtype=str(dtype).removeprefix("torch."), **overrides)
    return build_model(args, state, path, device)
