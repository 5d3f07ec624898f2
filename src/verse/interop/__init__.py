"""Checkpoints in and out: Verse/Hugging Face directories (`hf`, with per-architecture adapters `llama` and
`deepseek`), GGUF files (`gguf`), several ranks' training checkpoints (`dcp`), LoRA adapters in PEFT's file format
(`adapter`), and the `verse.load` dispatcher (`load`)."""
