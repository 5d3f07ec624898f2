"""Checkpoints in and out: Verse/Hugging Face directories (`hf`, with per-architecture adapters `llama` and
`deepseek`), GGUF files (`gguf`), and the `verse.load` dispatcher (`load`)."""
