"""Loading a model and its tokenizer for inference, with a dtype that runs fast on the device."""

from typing import Optional

import torch

from verse.errors import VerseError

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE_CHOICES = ("int8",)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16 / AMX); without them bf16 is emulated and slow."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_dtype(name: str, device: str | torch.device) -> Optional[torch.dtype]:
    """The dtype to load weights in.

    Args:
        name (str): "auto", "bfloat16", "float16" or "float32".
        device (str | torch.device): where the model runs.

    Returns:
        Optional[torch.dtype]: None keeps the checkpoint's dtype ("auto" on GPUs and on CPUs with native bf16);
        "auto" on other CPUs is float32, because their bf16/fp16 matmuls and attention are emulated
        (measured ~10x slower than float32 on an AVX2 EPYC; the bf16 -> float32 upcast is exact).
    """
    if name not in DTYPE_CHOICES:
        raise VerseError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
        return torch.float32
    return None


def load_for_inference(path: str, tokenizer: Optional[str] = None, device: str = "cpu", dtype: str = "auto",
                       adapter: Optional[str] = None, thinking: Optional[bool] = None,
                       quantize: Optional[str] = None, **overrides):
    """Load a model (anything `verse.load` accepts) and its tokenizer.

    Args:
        path (str): Verse / Hugging Face checkpoint directory, `.gguf` file or Hub id.
        tokenizer (Optional[str]): tokenizer name or path; default the checkpoint's own.
        device (str): "cpu", "cuda", ...
        dtype (str): see `inference_dtype`.
        adapter (Optional[str]): a LoRA adapter directory (PEFT format) to apply on top, unmerged.
        thinking (Optional[bool]): the chat template's reasoning switch (Qwen3's `enable_thinking`); None = the
            template's default.
        quantize (Optional[str]): "int8": weight-only int8 with per-row scales for the dense linear layers
            (`verse.model.linear.int8_weights_`: half the bytes of bf16 per decoded token; activations keep `dtype`).
        **overrides: execution-only `ModelArgs` fields for `verse.load` (e.g. `attn_impl="absorb"`).

    Returns:
        tuple: (model, tokenizer); the tokenizer fits the model's vocabulary (a byte tokenizer is narrowed to a
        256-id model).

    Raises:
        VerseError: the tokenizer has ids past the model's vocabulary (e.g. `--tokenizer o200k` on a small model),
            or `thinking` is set for a template without the switch; `quantize` is unknown or finds no dense linear
            layer (e.g. GGUF blocks kept with `--gemm-impl gguf`).
    """
    from verse.interop.load import load_model
    from verse.tokenization import load_tokenizer

    if quantize not in (None, *QUANTIZE_CHOICES):
        raise VerseError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    model = load_model(path, device=device, dtype=inference_dtype(dtype, device), **overrides)
    if adapter is not None:
        from verse.interop.adapter import load_adapter

        model = load_adapter(model, adapter).eval()
    if quantize == "int8":
        from verse.model.linear import int8_weights_

        if not any(getattr(m, "int8_scale", None) is not None for m in int8_weights_(model).modules()):
            raise VerseError(f"--quantize int8 found no dense linear layer in {path} (its weights are already "
                             "quantized, e.g. GGUF blocks with --gemm-impl gguf); drop --quantize")
    tokenizer = load_tokenizer(tokenizer or tokenizer_source(path))
    tokenizer.set_thinking(thinking)
    return model, tokenizer.fit_vocab(model.args.vocab_size, f"the model {path}")


def tokenizer_source(path: str) -> str:
    """Where a model's tokenizer lives: `path` itself, or for a LoRA adapter directory saved without one, its base."""
    from pathlib import Path

    from verse.interop.load import checkpoint_dir
    from verse.interop.adapter import is_adapter_dir, read_adapter_config

    directory = checkpoint_dir(Path(path)) if Path(path).is_dir() else None
    if directory is None or not is_adapter_dir(directory) or (directory / "tokenizer.json").is_file():
        return path
    return read_adapter_config(directory)[1].get("base_model_name_or_path") or path
