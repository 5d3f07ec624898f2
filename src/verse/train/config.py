"""`TrainConfig`: one flat schema for pretraining and SFT, loaded from YAML plus `key=value` overrides."""

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import yaml

from verse.errors import ConfigError
from verse.schema import as_number, check_keys, check_types

if TYPE_CHECKING:
    from verse.peft.lora import LoraArgs

MODES = ("sft", "pretrain", "grpo")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
PRECISIONS = ("bf16", "fp32", "fp8")
FP8_RECIPES = ("tensorwise", "rowwise")
PARAM_DTYPES = ("float32", "bfloat16")
BF16_UPDATES = ("master", "stochastic", "nearest")
FINETUNE_METHODS = ("full", "lora", "qlora")
GRPO_DEFAULTS: Dict[str, Any] = {
    "group_size": 8, "prompts_per_step": 4, "num_iterations": 1, "beta": 0.0, "epsilon": 0.2, "epsilon_high": None,
    "scale_rewards": True, "max_new_tokens": 256, "temperature": 1.0, "top_p": 1.0,
    "rewards": [{"name": "exact_answer", "weight": 1.0}], "eval_every": 0, "eval_problems": 64,
    "overlong_filter": False}
LORA_FIELDS = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["all"], "dora": False, "rslora": False}


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help shown by `verse train --print-config`."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Every field has a default; `verse train --print-config` lists them."""

    mode: str = _f("pretrain", "pretrain (a preset from scratch, or continue a checkpoint) | sft (fine-tune a "
                               "checkpoint on chat data; needs model=PATH) | grpo (reinforcement learning with "
                               "verifiable rewards from a checkpoint; the grpo section)")
    model: str = _f("tiny", "preset name (random init) or a checkpoint directory / .gguf file to start from")
    model_overrides: Dict[str, Any] = _f({}, "ModelArgs fields to change, e.g. {checkpointing: true}")
    tokenizer: Optional[str] = _f(None, "tokenizer name/path; default: the checkpoint's own, else the preset's")
    data: Any = _f({}, "data section (verse.data.DataConfig): sources, mix, packing, chat template, ...")
    finetune: Dict[str, Any] = _f({}, "method: full | lora | qlora (LoRA on an NF4 base); lora: {rank: 8, alpha: "
                                      "16, dropout: 0.0, targets: [all] (attention | mlp | all | names such as "
                                      "q_proj), dora: false, rslora: false}")
    grpo: Dict[str, Any] = _f({}, "mode=grpo: {group_size: 8 (completions per prompt), prompts_per_step: 4, "
                                  "num_iterations: 1 (updates per rollout, mu), beta: 0.0 (k3 KL weight; 0 = no "
                                  "reference model), epsilon: 0.2, epsilon_high: null (= epsilon), scale_rewards: "
                                  "true (false = Dr. GRPO), max_new_tokens: 256, temperature: 1.0, top_p: 1.0, "
                                  "rewards: [{name: exact_answer | format | length | module:function, weight: 1.0, "
                                  "args: {}}], eval_every: 0 (held-out accuracy every N steps), eval_problems: 64, "
                                  "overlong_filter: false (true = no loss on completions cut at max_new_tokens, "
                                  "DAPO)}")
    parallel: Dict[str, Any] = _f({}, "several ranks under torchrun: {dp_replicate, dp_shard (FSDP2; -1 = the "
                                      "rest), tp, ep, cpu_offload, timeout_s}; their product is WORLD_SIZE")
    out_dir: str = _f("runs/verse", "run directory: step-NNNNNNN/ checkpoints, latest, metrics.jsonl, plot.png")

    max_steps: int = _f(1000, "optimizer steps to run")
    max_seq_len: int = _f(1024, "tokens per sequence (must not exceed the model's max_seq_len)")
    micro_batch_size: int = _f(1, "sequences per forward/backward")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (loss normalised over their tokens)")

    precision: str = _f("bf16", "autocast compute dtype: bf16 | fp32 (no autocast) | fp8 (the blocks' linear layers "
                                "in float8 through torchao, the rest bf16; NVIDIA GPUs of compute capability 9.0+)")
    fp8_recipe: str = _f("tensorwise", "precision=fp8 scaling (torchao float8): tensorwise | rowwise")
    param_dtype: str = _f("float32", "parameter storage dtype: float32 | bfloat16")
    bf16_update: str = _f("master", "with bfloat16 params: master (fp32 master weights) | stochastic "
                                    "(stochastic rounding, torchao) | nearest")
    activation_checkpointing: int = _f(0, "recompute activations in backward: 0 off, k = every k-th layer (1 = all)")
    loss_chunk_size: int = _f(4096, "tokens per chunk of the cross-entropy (full fp32 logits never exist)")
    compile: Optional[bool] = _f(None, "torch.compile each transformer block (regional compilation): true | false | "
                                       "null = auto (on CUDA; off on CPU, where `verse bench train` shows it does not "
                                       "pay)")

    optimizer: str = _f("adamw", "adamw (fused where the device has it) | adamw8bit (torchao) | sgd")
    fused_backward: bool = _f(False, "step each parameter inside backward and free its grad (no persistent grads)")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of the decay")
    weight_decay: float = _f(0.1, "decoupled weight decay (never on norms, embeddings, biases)")
    beta1: float = _f(0.9, "Adam beta1 (SGD momentum)")
    beta2: float = _f(0.95, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = _f("cosine", "learning-rate schedule: cosine | linear | wsd (warmup-stable-decay) | constant")
    warmup_steps: int = _f(0, "linear warmup steps")
    decay_fraction: float = _f(0.2, "wsd: fraction of max_steps spent in the final decay")

    seed: int = _f(0, "seed of model init, data order and dropout-free RNG streams")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    save_every: int = _f(500, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(3, "keep the last K checkpoints (0 = keep all)")
    eval_every: int = _f(0, "held-out loss every N steps on the eval split (0 = off)")
    eval_batches: int = _f(8, "micro-batches per evaluation")
    log_every: int = _f(1, "progress-bar refresh interval in steps (metrics.jsonl gets every step)")
    max_bad_steps: int = _f(5, "stop after this many NaN/inf losses in a row")
    peak_flops: float = _f(0.0, "device peak FLOP/s for MFU (0 = from the device table, or measured on CPU)")
    tensorboard: bool = _f(True, "also write TensorBoard logs when tensorboard is installed")
    plot: bool = _f(True, "write plot.png (loss and throughput) at the end")

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (YAML-ready); a `DataConfig` in `data` becomes a dict too."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if dataclasses.is_dataclass(d["data"]):
            d["data"] = dataclasses.asdict(d["data"])
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (a parsed YAML file), rejecting unknown keys and bad values with one clear line."""
        cfg = cls(**check_keys(data, cls, source, hint="see `verse train --print-config`"))
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Sequence[str] = (), preset: Optional[str] = None
             ) -> "TrainConfig":
        """Load a YAML file (or start from defaults with `model=preset`) and apply `key=value` overrides.

        Args:
            path (Optional[str]): YAML file.
            overrides (Sequence[str]): `key=value` strings; values are parsed as YAML; dotted keys reach into
                `data` and `model_overrides` (e.g. `data.packing=true`).
            preset (Optional[str]): model preset to pretrain from (`verse train --preset NAME`).

        Returns:
            TrainConfig: the validated configuration.
        """
        data: Dict[str, Any] = {}
        source = "config"
        if path is not None:
            source = str(path)
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of training fields at the top level")
        if preset is not None:
            data.setdefault("mode", "pretrain")
            data["model"] = preset
        for item in overrides:
            apply_override(data, item)
        if preset is not None:
            _preset_defaults(data, preset)
        return cls.from_dict(data, source)

    def validate(self, source: str = "config") -> None:
        """Check every value (types first, then ranges; the data section too), raising `ConfigError` naming the
        first bad field."""

        def require(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: {name}: {message}")

        require(self.out_dir is not None, "out_dir", "is empty (YAML reads a bare ~ as null); give the run "
                "directory to create, e.g. out_dir=runs/NAME")
        for name in ("model_overrides", "finetune", "grpo"):  # a section left empty in YAML is null
            if getattr(self, name) is None:
                setattr(self, name, {})
        check_types(self, f"{source}: ")
        require(self.out_dir.strip() != "", "out_dir", "is empty; give the run directory to create, e.g. "
                "out_dir=runs/NAME (training never writes into the current directory)")
        require(self.tokenizer is None or self.tokenizer.strip() != "", "tokenizer",
                "is empty; give a tokenizer name or path, or leave it out to use the model's own")
        require(isinstance(self.data, dict) or dataclasses.is_dataclass(self.data), "data",
                f"must be a mapping (the data section: sources, packing, ...), got {type(self.data).__name__} "
                f"{self.data!r}")

        def one_of(name: str, choices: Sequence[str]) -> None:
            value = getattr(self, name)
            require(value in choices, name, f"must be one of {', '.join(choices)}, got {value!r}")

        for name in ("mode", "optimizer", "schedule", "precision", "param_dtype", "bf16_update", "fp8_recipe"):
            one_of(name, {"mode": MODES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS,
                          "param_dtype": PARAM_DTYPES, "bf16_update": BF16_UPDATES, "fp8_recipe": FP8_RECIPES}[name])
        for name in ("max_steps", "max_seq_len", "micro_batch_size", "gradient_accumulation_steps",
                     "loss_chunk_size", "max_bad_steps", "eval_batches", "log_every"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)!r}")
        for name in ("activation_checkpointing", "warmup_steps", "save_every", "keep_last", "eval_every", "seed",
                     "lr", "min_lr", "weight_decay", "eps", "grad_clip", "peak_flops"):
            require(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)!r}")
        require(self.seed < 2**32, "seed", f"must be below 2**32 (NumPy's limit), got {self.seed}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr!r}")
        require(self.min_lr <= self.lr, "min_lr", f"must not exceed lr ({self.lr}), got {self.min_lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, name, f"must be in [0, 1), got {value!r}")
        require(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        require(self.warmup_steps <= self.max_steps, "warmup_steps",
                f"({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        require(bool(self.model), "model", "must be a preset name or a path")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"), "device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.lora_args(source)
        self.grpo_args(source)
        from verse.train.distributed import ParallelConfig

        ParallelConfig.from_dict(self.parallel, source)
        require(self.precision != "fp8" or self.finetune_method == "full", "precision",
                "fp8 trains every weight (finetune.method=full); LoRA/QLoRA adapters train with precision=bf16")
        if self.fused_backward:
            require(self.gradient_accumulation_steps == 1, "fused_backward",
                    "steps inside backward, so it needs gradient_accumulation_steps=1")
            require(self.grad_clip == 0, "fused_backward",
                    "frees each grad right after its step, so global clipping is impossible: set grad_clip=0")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context of a step: bf16 for precision bf16 and fp8 (whose FP8 layers cast themselves)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision in ("bf16", "fp8"))

    @property
    def finetune_method(self) -> str:
        """`finetune.method`: full (every weight), lora or qlora."""
        return (self.finetune or {}).get("method", "full")

    def lora_args(self, source: str = "config") -> Optional["LoraArgs"]:
        """The validated `finetune:` section as `LoraArgs` (None for a full fine-tune).

        Raises:
            ConfigError: an unknown key or a bad value, naming the field (e.g. `finetune.lora.rank`).
        """
        from verse.peft.lora import LoraArgs, normalize_targets

        section = self.finetune or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: finetune: must be a mapping (method, lora), got {section!r}")
        unknown = sorted(set(section) - {"method", "lora"})
        if unknown:
            raise ConfigError(f"{source}: finetune: unknown field(s) {', '.join(unknown)} (known: method, lora)")
        method = section.get("method", "full")
        if method not in FINETUNE_METHODS:
            raise ConfigError(f"{source}: finetune.method: must be one of {', '.join(FINETUNE_METHODS)}, "
                              f"got {method!r}")
        lora = section.get("lora") or {}
        if not isinstance(lora, dict):
            raise ConfigError(f"{source}: finetune.lora: must be a mapping of {', '.join(LORA_FIELDS)}")
        unknown = sorted(set(lora) - set(LORA_FIELDS))
        if unknown:
            raise ConfigError(f"{source}: finetune.lora: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(LORA_FIELDS)})")
        if method == "full":
            if lora:
                raise ConfigError(f"{source}: finetune.lora: set finetune.method=lora or qlora to use it")
            return None
        values = {**LORA_FIELDS, **{k: as_number(v) if k in ("alpha", "dropout") else v for k, v in lora.items()}}

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: finetune.lora.{name}: {message}, got {values[name]!r}")

        check(isinstance(values["rank"], int) and not isinstance(values["rank"], bool) and values["rank"] > 0,
              "rank", "must be a positive integer")
        check(isinstance(values["alpha"], (int, float)) and not isinstance(values["alpha"], bool)
              and values["alpha"] > 0, "alpha", "must be a positive number")
        check(isinstance(values["dropout"], (int, float)) and 0 <= values["dropout"] < 1, "dropout",
              "must be in [0, 1)")
        for name in ("dora", "rslora"):
            check(isinstance(values[name], bool), name, "must be true or false")
        return LoraArgs(rank=values["rank"], alpha=float(values["alpha"]), dropout=float(values["dropout"]),
                        targets=normalize_targets(values["targets"]), dora=values["dora"], rslora=values["rslora"])


    def grpo_args(self, source: str = "config") -> Optional["GrpoArgs"]:
        """The validated `grpo:` section with its defaults filled in (None unless mode=grpo).

        Raises:
            ConfigError: an unknown key or a bad value, naming the field (e.g. `grpo.group_size`).
        """
        section = self.grpo or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: grpo: must be a mapping ({', '.join(GRPO_DEFAULTS)}), got {section!r}")
        if self.mode != "grpo":
            if section:
                raise ConfigError(f"{source}: grpo: set mode=grpo to use it (mode is {self.mode})")
            return None
        unknown = sorted(set(section) - set(GRPO_DEFAULTS))
        if unknown:
            raise ConfigError(f"{source}: grpo: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(GRPO_DEFAULTS)})")
        values = {**GRPO_DEFAULTS, **{k: as_number(v) if isinstance(v, str) else v for k, v in section.items()
                                      if k != "rewards"}, "rewards": section.get("rewards", GRPO_DEFAULTS["rewards"])}
        if values["epsilon_high"] is None:
            values["epsilon_high"] = values["epsilon"]

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: grpo.{name}: {message}, got {values[name]!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        for name in ("group_size", "prompts_per_step", "num_iterations", "max_new_tokens", "eval_problems"):
            check(is_int(values[name]) and values[name] > 0, name, "must be a positive integer")
        check(values["group_size"] > 1, "group_size", "must be at least 2 (advantages compare completions of a "
              "prompt with each other)")
        check(is_int(values["eval_every"]) and values["eval_every"] >= 0, "eval_every",
              "must be a non-negative integer (0 = off)")
        check(is_num(values["beta"]) and values["beta"] >= 0, "beta", "must be a number >= 0 (0 = no KL penalty)")
        for name in ("epsilon", "epsilon_high"):
            check(is_num(values[name]) and 0 < values[name], name, "must be a positive number")
        check(values["epsilon"] < 1, "epsilon", "must be below 1 (the ratio is clipped at 1 - epsilon)")
        check(is_num(values["temperature"]) and values["temperature"] > 0, "temperature",
              "must be a positive number (GRPO needs sampled, different completions)")
        check(is_num(values["top_p"]) and 0 < values["top_p"] <= 1, "top_p", "must be in (0, 1]")
        for name in ("scale_rewards", "overlong_filter"):
            check(isinstance(values[name], bool), name, "must be true or false")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError(f"{source}: gradient_accumulation_steps: mode=grpo accumulates every micro-batch of a "
                              f"step's group_size x prompts_per_step completions into one update already; set "
                              f"grpo.prompts_per_step for a larger batch (got {self.gradient_accumulation_steps})")
        rewards = values["rewards"]
        check(isinstance(rewards, list) and len(rewards) > 0, "rewards", "must be a non-empty list of "
              "{name, weight, args}")
        parsed = []  # names are resolved by verse.rl (built-ins, module:function) before the run writes anything
        for i, item in enumerate(rewards):
            where = f"{source}: grpo.rewards[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
                raise ConfigError(f"{where}: must be a reward name or a mapping with name, weight, args; got {item!r}")
            extra = sorted(set(item) - {"name", "weight", "args"})
            if extra:
                raise ConfigError(f"{where}: unknown field(s) {', '.join(extra)} (known: name, weight, args)")
            weight = as_number(item.get("weight", 1.0))
            if not is_num(weight):
                raise ConfigError(f"{where}.weight: must be a number, got {item.get('weight')!r}")
            args = item.get("args") or {}
            if not isinstance(args, dict):
                raise ConfigError(f"{where}.args: must be a mapping of keyword arguments, got {args!r}")
            parsed.append({"name": item["name"], "weight": float(weight), "args": args})
        values["rewards"] = parsed
        return GrpoArgs(**values)


@dataclass
class GrpoArgs:
    """The `grpo:` section of a `mode: grpo` run (see `TrainConfig.grpo` for each field's meaning)."""

    group_size: int
    prompts_per_step: int
    num_iterations: int
    beta: float
    epsilon: float
    epsilon_high: float
    scale_rewards: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    rewards: List[Dict[str, Any]]
    eval_every: int
    eval_problems: int
    overlong_filter: bool


def apply_override(data: Dict[str, Any], item: str) -> None:
    """Apply one `key=value` (value parsed as YAML; `a.b=v` sets `data[a][b]`) to a raw config dict."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    target = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = target.get(part)
        if node is None:
            node = target[part] = {}
        elif not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        target = node
    target[leaf] = value


def describe_fields() -> List[str]:
    """Lines `name: default  # help` for every field, as `verse train --print-config` prints them (valid YAML)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "data":
            lines.append(f"data:  # {f.metadata['help']}")
            lines.extend(f"  {line}" for line in _data_fields())
            continue
        rendered = yaml.safe_dump({f.name: default}, default_flow_style=True, width=1000).strip()[1:-1]
        lines.append(f"{rendered}  # {f.metadata['help']}")
    return lines


def _data_fields() -> List[str]:
    try:
        from verse.data import DataConfig
    except ImportError:
        return ["{}"]
    lines = []
    for f in dataclasses.fields(DataConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rendered = yaml.safe_dump({f.name: default}, default_flow_style=True, width=1000).strip()[1:-1]
        help_text = f.metadata.get("help", "")
        lines.append(f"{rendered}  # {help_text}" if help_text else rendered)
    return lines


def default_corpus() -> str:
    """The Python standard library's own sources: a text corpus every machine has (`verse train --preset`)."""
    import sysconfig

    return str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")


def _preset_defaults(data: Dict[str, Any], preset: str) -> None:
    """`verse train --preset NAME` runs as is: sequences no longer than the preset allows, and the standard
    library's sources as the pretraining corpus unless the user named data sources."""
    from verse.config import ModelArgs

    limit = ModelArgs.from_preset(preset).max_seq_len
    data.setdefault("max_seq_len", min(TrainConfig.max_seq_len, limit))
    data_section = data.setdefault("data", {})
    if isinstance(data_section, dict) and not data_section.get("sources"):
        data_section["sources"] = [{"path": default_corpus()}]
        data_section.setdefault("eval_fraction", 0.02)  # held-out files for eval_every
