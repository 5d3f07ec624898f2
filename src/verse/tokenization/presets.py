"""A preset's tokenizer and vocabulary: the one rule `verse train`, `verse plan` and `verse data` share.

A preset names its tokenizer (`byte`, `o200k`, or `hf`: its published model's own tokenizer.json, not shipped);
the model built from it takes the vocabulary size and bos/eos ids of the tokenizer the run uses.
"""

from pathlib import Path
from typing import Any, Optional

from verse.config import ModelArgs, count_params, list_presets
from verse.errors import ConfigError
from verse.tokenization import load_tokenizer, tokenizer_vocab

BUNDLED_TOKENIZERS = ("byte", "o200k")  # tokenizers Verse ships (a preset's "hf" is its model's own tokenizer.json)
DEFAULT_TOKENIZER = "o200k"  # Verse Mini's tokenizer: the one to name when a preset's own is not bundled


def preset_tokenizer(name: str) -> Optional[str]:
    """The bundled tokenizer a preset trains with when none is named (`byte`, `o200k`), or None for a published
    model's preset (`"tokenizer": "hf"`: its own tokenizer.json, which Verse does not ship)."""
    own = ModelArgs.from_preset(name).tokenizer
    return own if own in BUNDLED_TOKENIZERS else None


def run_tokenizer(model: str, tokenizer: Optional[str] = None) -> str:
    """The tokenizer spec of a run of `model` (a preset or a checkpoint path), as `verse train` and `verse data`
    pick it: `tokenizer` when named, else the checkpoint's own (its path), else the preset's bundled one.

    Raises:
        ConfigError: when `model` is neither an existing path nor a preset, or is a published model's preset (its
            own tokenizer is not shipped) and no tokenizer is named.
    """
    if tokenizer:
        return str(tokenizer)
    if Path(str(model)).exists():
        return str(model)
    if model not in list_presets():
        raise ConfigError(f"model={model!r}: neither an existing path nor a preset ({', '.join(list_presets())})")
    own = preset_tokenizer(model)
    if own is None:
        published = ModelArgs.from_preset(model)
        o200k = published.replace(vocab_size=tokenizer_vocab(DEFAULT_TOKENIZER)[0])
        raise ConfigError(f"model={model}: the preset keeps its published {published.vocab_size:,}-id vocabulary, and "
                          f"its own tokenizer is not bundled: set tokenizer= to it (a tokenizer.json directory, a "
                          f".gguf or a Hub id), or tokenizer={DEFAULT_TOKENIZER} (then the model has "
                          f"{o200k.vocab_size:,} ids, {count_params(o200k) / 1e9:.2f} B params)")
    return own


def preset_args(name: str, tokenizer: Any = None, **overrides: Any) -> ModelArgs:
    """The model `verse train` builds from a preset: the one rule `verse train`, `verse plan` and `verse data` share.

    The model's vocabulary is its tokenizer's. A preset keeps its published vocabulary (mistral-7b: 32,000 ids,
    7.24 B parameters), which is its own tokenizer's; another tokenizer sizes the model to its own vocabulary and
    bos/eos ids (mistral-7b with o200k: 200,019 ids, 8.62 B parameters), unless `vocab_size` is overridden.

    Args:
        name (str): the preset.
        tokenizer (Any): a tokenizer or a tokenizer spec (`run_tokenizer`); None keeps the published vocabulary.
        **overrides: ModelArgs fields to change.

    Returns:
        ModelArgs: the configuration.
    """
    args = ModelArgs.from_preset(name, **overrides)
    if tokenizer is None:
        return args
    if "vocab_size" in overrides:  # the tokenizer fitted to it (the byte tokenizer narrows to 256-260 ids)
        fitted = load_tokenizer(tokenizer).fit_vocab(args.vocab_size, f"model={name} (vocab_size {args.vocab_size})")
        ids = (("bos_token_id", fitted.bos_id), ("eos_token_id", fitted.eos_id))
        return args.replace(**{k: v for k, v in ids if k not in overrides})

    vocab_size, bos_id, eos_id = tokenizer_vocab(tokenizer)
    return args.replace(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)
