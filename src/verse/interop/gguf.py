"""GGUF (llama.cpp) files in and out: the `llama`, `qwen2`, `qwen3` and `qwen3moe` architectures.

Reading dequantizes every tensor with `gguf.quants.dequantize`; writing uses `gguf.GGUFWriter` one tensor at a
time. In the `llama` architecture llama.cpp stores the query/key rows of each head interleaved for its RoPE (pairs
(x0, x1), (x2, x3), ...), while Verse and Hugging Face rotate halves (x_i with x_{i + d/2}); `permute_qk`/
`unpermute_qk` convert. The Qwen architectures keep Hugging Face's order (llama.cpp's NEOX RoPE) and add, as its
convert_hf_to_gguf.py writes them: `attn_{q,k,v}.bias` (qwen2), `attn_{q,k}_norm.weight` (qwen3, qwen3moe), the
router `ffn_gate_inp.weight` (kept in F32) and the stacked experts `ffn_{gate,up,down}_exps.weight` [n_expert, out,
in] with `expert_count`, `expert_used_count`, `expert_feed_forward_length` (qwen3moe: every layer sparse, top-k
weights renormalised).
"""

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import gguf
import numpy as np
import torch
from tqdm import tqdm

import verse.ggml as ggml
from verse.config import ModelArgs, check_type
from verse.errors import CheckpointError, ConfigError
from verse.interop.gguf_header import GGUFFormatError, read_gguf_header, read_gguf_metadata, read_header
from verse.interop.gguf_header import TensorInfo as GGUFTensorInfo
from verse.interop.load import build_model, check_weights_fit
from verse.interop.qwen import check_saveable
from verse.jsonio import parse_json
from verse.model import ReasoningLLM
from verse.model.rope import rope_frequencies
from verse.publish import check_destination, staged

ARCH = "llama"
# Verse arch -> llama.cpp architecture, and back
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
VERSE_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
Q = gguf.GGMLQuantizationType
QUANTIZED = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SUPPORTED = (Q.F32, Q.F16, Q.BF16, *QUANTIZED)
# kept as they are with gemm_impl="gguf" (verse.ggml); others are dequantized
BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
WRITE_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
FILE_TYPES = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
              torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
ARGS_KEY = "verse.model_args"  # full ModelArgs as JSON, written by Verse; wins over the llama.* keys

GLOBAL_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "head.weight": "output.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight", "attn.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn.w1.weight": "ffn_gate.weight", "ffn.w2.weight": "ffn_down.weight", "ffn.w3.weight": "ffn_up.weight",
    "attn.wq.bias": "attn_q.bias", "attn.wk.bias": "attn_k.bias", "attn.wv.bias": "attn_v.bias",
    "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight", "ffn.experts.w1": "ffn_gate_exps.weight",
    "ffn.experts.w2": "ffn_down_exps.weight", "ffn.experts.w3": "ffn_up_exps.weight",
}
F32_NAMES = ("ffn_gate_inp.weight",)  # 2-D tensors llama.cpp keeps in F32 (besides every 1-D one)
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(name: str) -> str:
    """Verse tensor name -> GGUF name ("layers.3.attn.wq.weight" -> "blk.3.attn_q.weight")."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def verse_name(name: str) -> str:
    """GGUF tensor name -> Verse name; raises `KeyError` for names the Llama architecture does not have."""
    for verse, gg in GLOBAL_NAMES.items():
        if name == gg:
            return verse
    blk, layer, rest = name.split(".", 2) if name.count(".") >= 2 else ("", "", "")
    for verse, gg in LAYER_NAMES.items():
        if blk == "blk" and layer.isdigit() and rest == gg:
            return f"layers.{layer}.{verse}"
    raise KeyError(name)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> llama.cpp's interleaved rows, per head (as llama.cpp's convert_hf_to_gguf.py)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk`: llama.cpp's interleaved rows -> rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, raising `CheckpointError` when it is truncated or not GGUF."""
    try:
        read_header(path, keep=False)
    except (GGUFFormatError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({e})") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({reason})") from None


def _llama3_from_rope_freqs(args: ModelArgs, factors: torch.Tensor, path: Path) -> ModelArgs:
    """Recover Llama-3.1 RoPE scaling from llama.cpp's `rope_freqs` tensor (inv_freq / scaled_inv_freq).

    The tensor holds only the resulting factors; the Llama 3.1/3.2 parameters (low 1, high 4, original 8192)
    are assumed and checked against it.
    """
    candidate = args.replace(rope_scaling="llama3", rope_factor=float(factors.max()), original_seq_len=8192,
                             low_freq_factor=1.0, high_freq_factor=4.0)
    expected = rope_frequencies(args, args.head_dim) / rope_frequencies(candidate, args.head_dim)
    if factors.shape != expected.shape or not torch.allclose(factors.float(), expected, rtol=1e-4):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} holds a RoPE scaling Verse does not recognise "
                              "(only Llama-3.1 style scaling is supported)")
    return candidate


def _header_tensor(path: Path, info: GGUFTensorInfo) -> torch.Tensor:
    """One small tensor of a GGUF file, read at its offset (float32, PyTorch's order)."""
    kind = Q(info.tensor_type)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    count = int(np.prod(info.shape))
    raw = np.fromfile(path, dtype=np.uint8, count=count // block * size, offset=info.offset)
    data = np.require(gguf.quants.dequantize(raw, kind), np.float32, ["C", "W"])
    return torch.from_numpy(data.reshape(tuple(reversed(info.shape))))


def args_from_gguf(path: Path) -> ModelArgs:
    """`ModelArgs` of a GGUF file (`GGUF_ARCHS`) from its metadata (and tensor shapes where keys are absent).

    Only the header is read (`read_gguf_header`); no weight is.

    Args:
        path (Path): the file.

    Returns:
        ModelArgs: the configuration, `dtype` left at the default.
    """
    return _args_from_header(*read_gguf_header(path), path)


def _args_from_header(metadata: Dict[str, Any], tensors: Dict[str, GGUFTensorInfo], path: Path) -> ModelArgs:
    """`args_from_gguf` on a header already read; every metadata value is type-checked and named in errors."""
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if arch not in VERSE_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only "
                              f"{', '.join(map(repr, VERSE_ARCHS))})")
    if ARGS_KEY in metadata:
        source = f"{path} ({ARGS_KEY})"
        data = metadata[ARGS_KEY]
        if not isinstance(data, str) or not isinstance(data := parse_json(data, source), dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        try:
            return ModelArgs.from_dict(data, source)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    keys: Dict[str, str] = {}  # ModelArgs field -> the metadata key it came from, to name it in errors

    def read(name: str, key: str, default: Any = None, required: bool = False) -> Any:
        key = key.format(arch=arch)
        value = metadata.get(key)
        if value is None and required:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
        if value is None:
            return default
        keys[name] = key
        try:
            check_type(name, value, f"metadata key {key!r}")
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return value

    if GLOBAL_NAMES["embed.weight"] not in tensors:
        raise CheckpointError(f"{path}: tensor {GLOBAL_NAMES['embed.weight']} is missing")
    n_heads = read("n_heads", gguf.Keys.Attention.HEAD_COUNT, required=True)
    context = read("max_seq_len", gguf.Keys.LLM.CONTEXT_LENGTH, required=True)
    fields: Dict[str, Any] = dict(
        arch=VERSE_ARCHS[arch],
        vocab_size=read("vocab_size", gguf.Keys.LLM.VOCAB_SIZE, int(tensors["token_embd.weight"].shape[-1])),
        dim=read("dim", gguf.Keys.LLM.EMBEDDING_LENGTH, required=True),
        n_layers=read("n_layers", gguf.Keys.LLM.BLOCK_COUNT, required=True),
        n_heads=n_heads,
        n_kv_heads=read("n_kv_heads", gguf.Keys.Attention.HEAD_COUNT_KV, n_heads),
        head_dim=read("head_dim", gguf.Keys.Attention.KEY_LENGTH) or None,
        inter_dim=read("inter_dim", gguf.Keys.LLM.FEED_FORWARD_LENGTH, required=arch != "qwen3moe"),
        norm_eps=float(read("norm_eps", gguf.Keys.Attention.LAYERNORM_RMS_EPS, required=True)),
        max_seq_len=context,
        original_seq_len=context,
        rope_theta=float(read("rope_theta", gguf.Keys.Rope.FREQ_BASE, 10000.0)),
        tie_embeddings=GLOBAL_NAMES["head.weight"] not in tensors,
        bos_token_id=read("bos_token_id", gguf.Keys.Tokenizer.BOS_ID),
        eos_token_id=read("eos_token_id", gguf.Keys.Tokenizer.EOS_ID),
        tokenizer="hf",
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )
    experts = read("n_routed_experts", gguf.Keys.LLM.EXPERT_COUNT, 0)
    if experts:
        sparse = [f"blk.{i}.{LAYER_NAMES['ffn.gate.weight']}" in tensors for i in range(fields["n_layers"])]
        up = tensors.get(f"blk.{sparse.index(True) if True in sparse else 0}.ffn_up_exps.weight")
        fields.update(n_routed_experts=experts, score_func="softmax", norm_topk_prob=True,  # llama.cpp's qwen3moe
                      n_activated_experts=read("n_activated_experts", gguf.Keys.LLM.EXPERT_USED_COUNT, required=True),
                      moe_inter_dim=read("moe_inter_dim", gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
                                         int(up.shape[1]) if up is not None else None),
                      mlp_only_layers=[i for i, moe in enumerate(sparse) if not moe])
        if fields["moe_inter_dim"] is None:
            raise CheckpointError(f"{path}: metadata key {arch}.expert_feed_forward_length is missing")
        fields["inter_dim"] = fields["inter_dim"] or fields["moe_inter_dim"]
    scaling = read("rope_scaling", gguf.Keys.Rope.SCALING_TYPE, "none")
    if scaling in ("linear", "yarn"):
        fields.update(rope_scaling=scaling,
                      rope_factor=float(read("rope_factor", gguf.Keys.Rope.SCALING_FACTOR, required=True)))
        original = read("original_seq_len", gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)
        if original:
            fields["original_seq_len"] = original
    elif scaling != "none":
        raise CheckpointError(f"{path}: RoPE scaling type {scaling!r} is not supported (none, linear, yarn, llama3)")
    try:
        args = ModelArgs(**fields)
    except ConfigError as e:
        key = keys.get(e.field)
        raise CheckpointError(f"{path}: {e}" + (f" (metadata key {key!r})" if key else "")) from None
    if ROPE_FREQS in tensors:
        args = _llama3_from_rope_freqs(args, _header_tensor(path, tensors[ROPE_FREQS]), path)
    return args


def supported_type(tensor: Any, path: Path) -> Any:
    """The ggml type of a tensor (a GGUFReader tensor or a header entry), raising when Verse cannot read it."""
    kind = Q(tensor.tensor_type)
    if kind not in SUPPORTED:
        raise CheckpointError(f"{path}: tensor {tensor.name} has GGUF type {kind.name}, which Verse cannot read "
                              f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    return kind


def dequantize(tensor: Any, path: Path) -> torch.Tensor:
    """A GGUF tensor (F32/F16/BF16 or quantized) as a float32 torch tensor in PyTorch's [out, in] order."""
    kind = supported_type(tensor, path)
    try:
        data = gguf.quants.dequantize(np.asarray(tensor.data), kind)  # plain ndarray: memmap slicing is slow
        shape = tuple(int(n) for n in reversed(tensor.shape))
        data = np.require(data, np.float32, ["C", "W"]).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: tensor {tensor.name} cannot be decoded ({e})") from None
    return torch.from_numpy(data)


def file_blocks(tensor: Any) -> torch.Tensor:
    """A quantized GGUF matrix as its raw blocks: uint8 [out, in / block values * block bytes] (see `verse.ggml`)."""
    return torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).view(int(tensor.shape[1]), -1)


def load_gguf(path: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
              **overrides: Any) -> ReasoningLLM:
    """Load a `.gguf` file (architectures `GGUF_ARCHS`) into a `ReasoningLLM`.

    Args:
        path (Path): the file.
        device (torch.device | str): where the weights go.
        dtype (Optional[torch.dtype]): parameter dtype; None = the file's (any quantized tensor -> bfloat16).
        **overrides: execution-only `ModelArgs` fields.

    Returns:
        ReasoningLLM: the model in eval mode.
    """
    metadata, header = read_gguf_header(path)
    args = _args_from_header(metadata, header, path)
    for info in header.values():
        supported_type(info, path)
    embed = header[GLOBAL_NAMES["embed.weight"]].shape
    stacked = {int(info.shape[-1]) for name, info in header.items() if name.endswith("_exps.weight")}
    check_weights_fit(args, (name for name in header if name != ROPE_FREQS), tuple(reversed(embed)), path,
                      n_experts=min(stacked, default=None))
    gguf_arch = GGUF_ARCHS[args.arch]
    reader = open_gguf(path)  # maps every tensor: only once the header is known to describe this model
    weights = [t for t in reader.tensors if t.name != ROPE_FREQS]
    if dtype is None:
        kinds = {Q(t.tensor_type) for t in weights if len(t.shape) > 1}
        dtype = torch.bfloat16 if kinds - {Q.F32, Q.F16} else torch.float16 if Q.F16 in kinds else torch.float32
    args = args.replace(dtype=str(dtype).removeprefix("torch."), **overrides)
    state, types = {}, {}
    for tensor in tqdm(weights, desc="dequantizing", unit="tensor", disable=None, leave=False):
        try:
            name = verse_name(tensor.name)
        except KeyError:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name} for the {gguf_arch} architecture") \
                from None
        keep = args.gemm_impl == "gguf" and Q(tensor.tensor_type) in BLOCK_TYPES and len(tensor.shape) == 2
        if keep and name != "embed.weight":
            w, types[name] = file_blocks(tensor), int(tensor.tensor_type)
        else:
            w = dequantize(tensor, path).to(dtype)
        heads = args.n_heads if name.endswith("attn.wq.weight") else args.n_kv_heads
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            if w.shape[0] != heads * args.head_dim:
                raise CheckpointError(f"{path}: tensor {tensor.name} has {w.shape[0]} rows, but the metadata says "
                                      f"{heads} heads of {args.head_dim}; the file does not match its metadata")
            if gguf_arch == ARCH:
                w = unpermute_qk(w, heads)
        state[name] = w.contiguous().to(device)
        if keep and name == "embed.weight" and args.tie_embeddings:  # lookups use the dense table; the head, blocks
            state["head.weight"], types["head.weight"] = file_blocks(tensor).to(device), int(tensor.tensor_type)
    blocks = [name for name, t in state.items() if t.dtype == torch.uint8]
    if blocks and torch.device(device).type == "cpu":
        state.update(zip(blocks, ggml.pack([state[name] for name in blocks])))
    return build_model(args, state, path, device, types)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: Optional[str]) -> bool:
    """Add gpt2-style BPE tokenizer keys from the tokenizer's tokenizer.json; False when it is not byte-level BPE.
    `pre` None takes the tokenizer's own (`Tokenizer.gguf_pre`)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            return False
        spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or not byte_level:
        return False
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or tokenizer.gguf_pre())
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return True


def _check_gguf_arch(args: ModelArgs) -> str:
    """The llama.cpp architecture a model is written as, or a `ConfigError` naming the field llama.cpp cannot hold."""
    arch = GGUF_ARCHS.get(args.arch)
    if arch is None or args.attention != "gqa":
        raise ConfigError(f"GGUF export supports Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE models, not arch {args.arch!r}")
    if arch == ARCH:
        for name, other in (("qkv_bias", "qwen2"), ("qk_norm", "qwen3"), ("n_routed_experts", "qwen3_moe")):
            if getattr(args, name):
                raise ConfigError(f"ModelArgs.{name}: llama.cpp's llama architecture has none; use arch {other!r}",
                                  name)
        return arch
    check_saveable(args, args.arch)  # what transformers' Qwen classes hold, llama.cpp's Qwen architectures hold
    if args.rope_scaling == "llama3":
        raise ConfigError(f"ModelArgs.rope_scaling: llama.cpp's {arch} architecture has no llama3 scaling",
                          "rope_scaling")
    if args.is_moe and not (all(map(args.is_moe_layer, range(args.n_layers))) and args.norm_topk_prob):
        bad = "norm_topk_prob" if all(map(args.is_moe_layer, range(args.n_layers))) else "mlp_only_layers"
        raise ConfigError(f"ModelArgs.{bad}: llama.cpp's qwen3moe makes every layer sparse and renormalises the "
                          "top-k weights (norm_topk_prob)", bad)
    return arch


def save_gguf(model: ReasoningLLM, path: str | Path, tokenizer: Any = None, dtype: Optional[torch.dtype] = None,
              pre: Optional[str] = None, overwrite: bool = False) -> None:
    """Write a Verse model as a GGUF file of llama.cpp's `llama`, `qwen2`, `qwen3` or `qwen3moe` architecture (by
    `args.arch`; 1-D tensors and the MoE router in F32, the rest in `dtype`).

    Args:
        model (ReasoningLLM): the model (grouped-query attention; MoE only as Qwen3-MoE).
        path (str | Path): output `.gguf` file, new unless `overwrite`; written to a temporary file beside it, then
            published atomically (`verse.publish`).
        tokenizer: optional Verse tokenizer; byte-level BPE tokenizers are stored as gpt2-style metadata.
        dtype (Optional[torch.dtype]): float32, float16 or bfloat16; None = the model's.
        pre (Optional[str]): llama.cpp pre-tokenizer name stored with the tokenizer; None = the one whose regex
            the tokenizer's tokenizer.json splits with (`Tokenizer.gguf_pre`).
        overwrite (bool): replace an existing file at `path`.
    """
    args = model.args
    arch = _check_gguf_arch(args)
    dtype = dtype or model.embed.weight.dtype
    if dtype not in WRITE_TYPES:
        raise ConfigError(f"GGUF export dtype must be float32, float16 or bfloat16, got {dtype}")
    path = check_destination(path, overwrite=overwrite, directory=False)
    state = {k: v for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "head.weight")}

    def kind_of(name: str, tensor: torch.Tensor) -> Any:
        f32 = tensor.dim() == 1 or gguf_name(name).endswith(F32_NAMES)  # as llama.cpp's converter keeps them
        return Q.F32 if f32 else WRITE_TYPES[dtype]

    def as_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
        if arch == ARCH and name.endswith("attn.wq.weight"):
            tensor = permute_qk(tensor, args.n_heads)
        elif arch == ARCH and name.endswith("attn.wk.weight"):
            tensor = permute_qk(tensor, args.n_kv_heads)
        kind = kind_of(name, tensor)
        tensor = tensor.detach().to("cpu", torch.float32 if kind == Q.F32 else dtype).contiguous()
        return tensor.view(torch.uint16).numpy() if kind == Q.BF16 else tensor.numpy()

    with staged(path, directory=False, replace=overwrite) as tmp, contextlib.closing(gguf.GGUFWriter(tmp, arch)) \
            as writer:
        writer.add_name(path.stem)
        writer.add_file_type(FILE_TYPES[dtype])
        writer.add_vocab_size(args.vocab_size)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.inter_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_rope_freq_base(args.rope_theta)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        if args.rope_scaling in ("linear", "yarn"):
            writer.add_rope_scaling_type(args.rope_scaling)
            writer.add_rope_scaling_factor(args.rope_factor)
            writer.add_rope_scaling_orig_ctx_len(args.original_seq_len)
        if args.is_moe:
            writer.add_expert_count(args.n_routed_experts)
            writer.add_expert_used_count(args.n_activated_experts)
            writer.add_expert_feed_forward_length(args.moe_inter_dim)
        writer.add_string(ARGS_KEY, json.dumps({**args.to_dict(), "dtype": str(dtype).removeprefix("torch.")}))
        has_tokenizer = tokenizer is not None and _tokenizer_metadata(writer, tokenizer, args.vocab_size, pre)
        if tokenizer is not None and not has_tokenizer:
            print(f"note: tokenizer {getattr(tokenizer, 'name', '')!r} is not byte-level BPE; "
                  "the GGUF carries no tokenizer")
        if not has_tokenizer and args.bos_token_id is not None:
            writer.add_bos_token_id(args.bos_token_id)
        if not has_tokenizer and args.eos_token_id is not None:
            writer.add_eos_token_id(args.eos_token_id)
        extra = {}
        if args.rope_scaling == "llama3":
            # llama.cpp's form of Llama-3.1 scaling: per-frequency divisors in a `rope_freqs` tensor.
            base = rope_frequencies(args.replace(rope_scaling="none"), args.head_dim)
            extra[ROPE_FREQS] = (base / rope_frequencies(args, args.head_dim)).numpy()
        for name, tensor in state.items():
            shape, kind = tuple(tensor.shape), kind_of(name, tensor)
            nbytes = tensor.numel() * (4 if kind == Q.F32 else 2)
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[kind]
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np_dtype), nbytes,
                                   raw_dtype=kind if kind == Q.BF16 else None)
        for name, array in extra.items():
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor in tqdm(state.items(), desc="writing gguf", unit="tensor", disable=None, leave=False):
            writer.write_tensor_data(as_numpy(name, tensor))
        for array in extra.values():
            writer.write_tensor_data(array)


def gguf_tokenizer_pre(path: Path) -> str:
    """The llama.cpp pre-tokenizer name of a GGUF file ("default" when absent), to carry it through a conversion."""
    return read_gguf_metadata(path).get(gguf.Keys.Tokenizer.PRE, "default")

