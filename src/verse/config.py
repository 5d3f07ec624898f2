"""Model configuration: the `ModelArgs` dataclass, JSON presets, validation and parameter counts."""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from verse.errors import ConfigError
from verse.jsonio import read_json

PRESETS_DIR = Path(__file__).parent / "presets"
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
# architecture families (Hugging Face model_type each saves as)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3")
DTYPES = ("bfloat16", "float16", "float32")
# other spellings of the DTYPES users type (CLI options, configs): short names and the GGUF/safetensors style
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16", "fp32": "float32",
                 "f32": "float32"}


@dataclass
class ModelArgs:
    """Hyperparameters of a `ReasoningLLM`: the dense Llama/Mistral/Qwen family, Qwen3-MoE and DeepSeek (MLA + MoE).

    Fields that change weights (sizes) and fields that only change execution (`dtype`, `attn_impl`,
    `gemm_impl`, `checkpointing`) live side by side; `verse.load(path, **overrides)` accepts the latter.
    """

    # architecture family (`ARCHS`), used to pick the Hugging Face class on save
    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None = dim // n_heads
    inter_dim: int = 11008  # SwiGLU hidden size of dense layers
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral: attend to at most this many previous tokens
    qkv_bias: bool = False  # Qwen2/2.5: the query, key and value projections have a bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm (weight [head_dim]) on queries and keys, before RoPE

    # RoPE and its context-extension scalings (none, linear, llama3, yarn)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    original_seq_len: int = 4096  # context length the model was pretrained with (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn softmax-scale correction
    mscale_all_dim: float = 0.0  # yarn (DeepSeek-V2 `mscale_all_dim`)

    # Multi-head Latent Attention (DeepSeek-V2/V3); used when attention == "mla"
    attention: str = "gqa"  # gqa | mla
    q_lora_rank: int = 0  # 0 = plain query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # Mixture of Experts; a layer i is MoE when n_routed_experts > 0, i >= n_dense_layers,
    # (i - n_dense_layers) % moe_layer_freq == 0 and i is not in mlp_only_layers (Qwen3-MoE's
    # decoder_sparse_step s is n_dense_layers = s - 1, moe_layer_freq = s)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0
    moe_inter_dim: int = 1408
    n_dense_layers: int = 0
    moe_layer_freq: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)  # layers kept dense (Qwen3-MoE `mlp_only_layers`)
    score_func: str = "softmax"  # softmax | sigmoid
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    route_scale: float = 1.0
    norm_topk_prob: bool = False
    aux_loss_alpha: float = 0.0
    router_bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 = off

    # tokenizer the model was trained with: "o200k", "byte", or "hf" (its own tokenizer.json)
    tokenizer: str = "hf"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    # execution only (never change weights)
    dtype: str = "bfloat16"
    attn_impl: str = "naive"  # MLA: naive (full K/V) | absorb (latent cache)
    gemm_impl: str = "bf16"  # bf16 | fp8 | gguf (keep a GGUF file's quantized blocks: verse.ggml.NAMES)
    checkpointing: bool = False  # activation checkpointing (verse.load and the trainer call parallelize.apply_ac)
    checkpoint_every: int = 1  # checkpoint every k-th layer when checkpointing

    def __post_init__(self) -> None:
        check_types(self)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        validate(self)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def rope_dim(self) -> int:
        """Channels RoPE rotates per head (`qk_rope_head_dim` for MLA, else `head_dim`)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer `layer_id` uses a Mixture-of-Experts FFN (else a dense SwiGLU)."""
        return (
            self.is_moe
            and layer_id >= self.n_dense_layers
            and (layer_id - self.n_dense_layers) % self.moe_layer_freq == 0
            and layer_id not in self.mlp_only_layers
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelArgs":
        """A copy with some fields changed (validated)."""
        check_fields(changes, "overrides")
        # fields derived in __post_init__ stay derived unless given: tiny with dim=128 gets head_dim 32, not 16
        if "head_dim" not in changes and self.head_dim == self.dim // self.n_heads:
            changes["head_dim"] = None
        if "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            changes["n_kv_heads"] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "ModelArgs":
        """Build from a dict, rejecting unknown keys with a clear error."""
        check_fields(data, source)
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_json(path, ConfigError), str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        """Load a preset from `verse/presets/NAME.json`, optionally overriding fields."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
        args = cls.from_json(path)
        return args.replace(**overrides) if overrides else args


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ModelArgs)}


def dtype_name(name: str) -> str:
    """The canonical name (one of `DTYPES`) of a dtype spelling: "bf16" -> "bfloat16", "float32" -> "float32".

    Raises:
        ConfigError: for a dtype Verse does not store parameters in.
    """
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return canonical


def list_presets() -> List[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def check_fields(data: Dict[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown ModelArgs field(s) {', '.join(unknown)}")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"ModelArgs.{field_name}: {message}", field_name)


def _type_ok(value: Any, kind: Any) -> bool:
    """Whether `value` has the annotated type `kind` (int, float, bool, str, List or Optional of one); bool is not
    int."""
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(kind)[0]) for v in value)
    if typing.get_origin(kind) is typing.Union:
        return any(_type_ok(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        try:
            return isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False
    return isinstance(value, kind)


def check_type(name: str, value: Any, label: Optional[str] = None) -> None:
    """Raise `ConfigError` unless `value` has the type of `ModelArgs` field `name`.

    Args:
        name (str): the `ModelArgs` field.
        value (Any): its candidate value.
        label (Optional[str]): how the error names the field (default `ModelArgs.NAME`), e.g. a config.json key.
    """
    kind = FIELD_TYPES[name]
    if _type_ok(value, kind):
        return
    optional = typing.get_origin(kind) is typing.Union
    base = next(k for k in typing.get_args(kind) if k is not type(None)) if optional else kind
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             List[int]: "a list of integers"}
    message = f"must be {names[base]}{' or null' if optional else ''}, got {value!r:.40}"
    if label is None:
        _require(False, name, message)
    raise ConfigError(f"{label}: {message}", name)


def check_types(args: "ModelArgs") -> None:
    """Check every field's type (a finite number for floats, a true int for ints), naming the first bad field."""
    for f in dataclasses.fields(args):
        check_type(f.name, getattr(args, f.name))


def validate(args: ModelArgs) -> None:
    """Check a configuration, raising `ConfigError` that names the first bad field."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "inter_dim", "max_seq_len"):
        value = getattr(args, name)
        _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
    _require(args.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}, got {args.arch!r}")
    _require(args.attention in ("gqa", "mla"), "attention", f"must be 'gqa' or 'mla', got {args.attention!r}")
    for name in ("n_kv_heads", "head_dim", "original_seq_len", "checkpoint_every", "sliding_window"):
        value = getattr(args, name)
        _require(value is None or value > 0, name, f"must be a positive integer, got {value!r}")
    for name in ("n_routed_experts", "n_shared_experts", "n_activated_experts", "n_dense_layers", "bos_token_id",
                 "eos_token_id"):
        value = getattr(args, name)
        _require(value is None or value >= 0, name, f"must be >= 0, got {value!r}")
    if args.attention == "gqa":
        _require(args.n_heads % args.n_kv_heads == 0, "n_kv_heads",
                 f"n_heads ({args.n_heads}) must be divisible by n_kv_heads ({args.n_kv_heads})")
        _require(args.head_dim is not None, "dim",
                 f"dim ({args.dim}) must be divisible by n_heads ({args.n_heads}), or set head_dim")
        _require(args.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {args.head_dim}")
    else:
        for name in ("qkv_bias", "qk_norm"):
            _require(not getattr(args, name), name, "is for attention='gqa' (MLA has its own projections); "
                     "set it to false")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(args, name) > 0, name, f"must be positive for MLA, got {getattr(args, name)}")
        _require(args.q_lora_rank >= 0, "q_lora_rank", f"must be >= 0, got {args.q_lora_rank}")
        _require(args.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even for RoPE")
    _require(args.norm_eps > 0, "norm_eps", f"must be positive, got {args.norm_eps}")
    _require(args.rope_theta > 0, "rope_theta", f"must be positive, got {args.rope_theta}")
    _require(args.rope_scaling in ROPE_SCALINGS, "rope_scaling",
             f"must be one of {', '.join(ROPE_SCALINGS)}, got {args.rope_scaling!r}")
    _require(args.rope_factor >= 1.0 or args.rope_scaling == "none", "rope_factor",
             f"must be >= 1 with {args.rope_scaling} scaling, got {args.rope_factor}")
    _require(args.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    _require(args.attn_impl in ("naive", "absorb"), "attn_impl", f"must be 'naive' or 'absorb', got {args.attn_impl!r}")
    _require(args.gemm_impl in ("bf16", "fp8", "gguf"), "gemm_impl",
             f"must be 'bf16', 'fp8' or 'gguf', got {args.gemm_impl!r}")
    _require(args.tokenizer in ("o200k", "byte", "hf"), "tokenizer",
             f"must be 'o200k', 'byte' or 'hf', got {args.tokenizer!r}")
    if args.is_moe:
        _require(0 < args.n_activated_experts <= args.n_routed_experts, "n_activated_experts",
                 f"must be in 1..n_routed_experts ({args.n_routed_experts}), got {args.n_activated_experts}")
        _require(args.score_func in ("softmax", "sigmoid"), "score_func",
                 f"must be 'softmax' or 'sigmoid', got {args.score_func!r}")
        _require(args.n_expert_groups >= 1 and args.n_routed_experts % args.n_expert_groups == 0, "n_expert_groups",
                 f"n_routed_experts ({args.n_routed_experts}) must be divisible by n_expert_groups ({args.n_expert_groups})")
        _require(1 <= args.n_limited_groups <= args.n_expert_groups, "n_limited_groups",
                 f"must be in 1..n_expert_groups ({args.n_expert_groups}), got {args.n_limited_groups}")
        per_group = args.n_routed_experts // args.n_expert_groups
        _require(args.n_activated_experts <= args.n_limited_groups * per_group, "n_activated_experts",
                 f"{args.n_activated_experts} experts cannot be picked from {args.n_limited_groups} group(s) of "
                 f"{per_group}; raise n_limited_groups or lower n_activated_experts")
        _require(args.n_expert_groups == 1 or per_group >= 2 or not (args.score_func == "sigmoid"
                 or args.router_bias_update_rate > 0), "n_expert_groups",
                 "groups scored by their top-2 experts (sigmoid or routing bias) need at least 2 experts per group")
        _require(args.router_bias_update_rate >= 0, "router_bias_update_rate",
                 f"must be >= 0, got {args.router_bias_update_rate}")
        _require(args.aux_loss_alpha >= 0, "aux_loss_alpha", f"must be >= 0, got {args.aux_loss_alpha}")
        _require(args.moe_layer_freq >= 1, "moe_layer_freq", f"must be >= 1, got {args.moe_layer_freq}")
        _require(args.moe_inter_dim > 0, "moe_inter_dim", f"must be positive, got {args.moe_inter_dim}")
    bad = [i for i in args.mlp_only_layers if not 0 <= i < args.n_layers]
    _require(not bad, "mlp_only_layers", f"layer {bad[0] if bad else 0} is not in 0..{args.n_layers - 1}")


def _attention_params(args: ModelArgs) -> int:
    if args.attention == "gqa":
        q = args.dim * args.n_heads * args.head_dim
        kv = 2 * args.dim * args.n_kv_heads * args.head_dim
        bias = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim if args.qkv_bias else 0
        norms = 2 * args.head_dim if args.qk_norm else 0
        return q + kv + args.n_heads * args.head_dim * args.dim + bias + norms
    qk_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
    if args.q_lora_rank == 0:
        q = args.dim * args.n_heads * qk_head_dim
    else:
        q = args.dim * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * args.n_heads * qk_head_dim
    kv = (args.dim * (args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank
          + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim))
    return q + kv + args.n_heads * args.v_head_dim * args.dim


def count_params(args: ModelArgs, active: bool = False) -> int:
    """Number of parameters, computed from the configuration alone (no weights allocated).

    Args:
        args (ModelArgs): the configuration.
        active (bool): count only the parameters used per token (MoE: activated + shared experts).

    Returns:
        int: parameter count (embedding and output head included; tied embeddings counted once).
    """
    embed = args.vocab_size * args.dim
    total = embed if args.tie_embeddings else 2 * embed
    total += args.dim  # final norm
    for layer_id in range(args.n_layers):
        total += 2 * args.dim + _attention_params(args)  # attn_norm, ffn_norm
        if args.is_moe_layer(layer_id):
            experts = args.n_activated_experts if active else args.n_routed_experts
            total += 3 * args.dim * args.moe_inter_dim * (experts + args.n_shared_experts)
            total += args.n_routed_experts * args.dim  # router
            if args.score_func == "sigmoid" or args.router_bias_update_rate > 0:
                total += args.n_routed_experts  # routing bias (DeepSeek-V3 e_score_correction_bias)
        else:
            total += 3 * args.dim * args.inter_dim
    return total
