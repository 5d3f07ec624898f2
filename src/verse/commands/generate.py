"""`verse generate`: continue a prompt (or answer it as a chat message) with any model `verse.load` accepts."""

import argparse
import json
import sys
import time

HELP = "Generate text from a Verse/Hugging Face checkpoint directory or a .gguf file (KV-cache decoding)."
EXAMPLES = """  verse generate model.gguf --prompt 'What is 2+2?' --chat
  verse generate runs/sft/final --prompt 'Once upon a time' --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 0
  verse generate model.gguf --prompt 'Solve x^2=4' --chat --system 'Think step by step.' --think hide
  verse generate model.gguf --prompt 'Hi' --chat --json     # one JSON object: text, prompt_tokens, new_tokens, ...
  verse generate model.gguf --prompt 'Hi' --chat --gemm-impl gguf --compile   # fastest on CPU (llama.cpp's math)
  verse generate base/ --adapter runs/lora/latest --prompt 'Hi' --chat   # base + LoRA adapter, unmerged
  verse generate Qwen3-0.6B/ --prompt 'What is 2+2?' --chat --thinking off   # answer without <think> reasoning
"""
THINKING = {"on": True, "off": False}


def add_thinking_argument(parser: argparse.ArgumentParser) -> None:
    """`--thinking on|off`: the chat template's reasoning switch (generate, chat, serve)."""
    parser.add_argument("--thinking", choices=tuple(THINKING), default=None,
                        help="chat templates with a reasoning switch (Qwen3's enable_thinking): on = the model "
                             "reasons in <think> first, off = the prompt closes an empty <think> and the model "
                             "answers directly (default: the template's own, on for Qwen3)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `verse generate` and `verse chat`: model loading and sampling."""
    from verse.infer.chat import THINK_MODES
    from verse.infer.runtime import DTYPE_CHOICES, QUANTIZE_CHOICES

    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, HF model directory or .gguf file")
    parser.add_argument("--system", default=None, help="system prompt (chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--think", choices=THINK_MODES, default="dim",
                        help="<think> reasoning: show as is, hide, or dim (default; plain text when not a terminal)")
    add_thinking_argument(parser)
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the checkpoint's)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapter directory (PEFT format, e.g. a LoRA run's checkpoint) applied on top of "
                             "CKPT without merging")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto = the checkpoint's, but float32 on CPUs without native bf16")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8: weight-only int8 (per-row scales) for dense checkpoints: half the bytes of bf16 per "
                             "token, faster CPU decoding; outputs close to, not equal to, the dense model's")
    parser.add_argument("--attn-impl", choices=("naive", "absorb"), default=None,
                        help="MLA models: absorb caches only the latent and rope key (default: the checkpoint's)")
    parser.add_argument("--gemm-impl", choices=("bf16", "fp8", "gguf"), default=None,
                        help="FP8 checkpoints: keep FP8 weights (fp8) or compute in bf16 (default: the checkpoint's); "
                             ".gguf files: gguf multiplies the file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K blocks "
                             "as they are, as llama.cpp does (fastest on CPU: several times fewer bytes per token)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile (faster per token; the first run for a "
                             "model compiles for about a minute, later runs reuse inductor's cache; on CUDA a static "
                             "KV cache whose one graph is replayed as a CUDA graph per token)")


def check_generation_arguments(args: argparse.Namespace) -> None:
    """Check the options of `verse generate` / `verse chat` before the model loads (one line for a bad one), and
    repair text arguments: bytes that are not UTF-8 (Python keeps them as lone surrogates) become U+FFFD."""
    from verse.devices import resolve_device
    from verse.errors import VerseError
    from verse.infer.chat import valid_text
    from verse.infer.sampling import SamplingParams, check_seed

    for name in ("prompt", "system"):
        if getattr(args, name, None) is not None:
            setattr(args, name, valid_text(getattr(args, name)))
    args.stop = [valid_text(text) for text in args.stop] if args.stop else args.stop
    if args.max_new_tokens < 1:
        raise VerseError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # raises for a bad value
    check_seed(args.seed)
    resolve_device(args.device, "--device")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Sampling/stopping keyword arguments of `verse.infer.generate` from parsed options."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, stop_strings=args.stop, seed=args.seed,
                compile=args.compile)


def execution_overrides(args: argparse.Namespace) -> dict:
    """`load_for_inference` options chosen on the command line: `thinking`, `quantize` and the `verse.load`
    overrides (`attn_impl`, `gemm_impl`)."""
    return {k: v for k, v in (("attn_impl", args.attn_impl), ("gemm_impl", args.gemm_impl)) if v is not None} | {
        "thinking": THINKING.get(args.thinking), "quantize": args.quantize}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: text, prompt_tokens, new_tokens, tokens_per_s, "
                             "time_to_first_token_s")


def run(args: argparse.Namespace) -> int:
    from verse.errors import VerseError
    from verse.infer.chat import ThinkRenderer, chat_prompt, opens_in_think, text_prompt
    from verse.infer.generate import stream
    from verse.infer.runtime import load_for_inference
    from verse.terminal import for_stream, is_terminal

    check_generation_arguments(args)
    model, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype, args.adapter,
                                          **execution_overrides(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt, opened = chat_prompt(tokenizer, messages), opens_in_think(tokenizer, messages)
    else:
        if args.system:
            raise VerseError("--system needs --chat (it is a chat message)")
        prompt, opened = text_prompt(tokenizer, args.prompt), False
    if not prompt:
        raise VerseError("--prompt is empty and the tokenizer has no BOS token to start from")
    renderer = ThinkRenderer(args.think if is_terminal(sys.stdout) or args.think != "dim" else "show", opened)
    ids, first, shown = [], None, 0
    start = time.perf_counter()
    for token in stream(model, tokenizer, prompt, **generation_kwargs(args)):
        first = first or time.perf_counter()
        ids.append(token)
        text = tokenizer.decode(ids)
        if not args.json and not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            print(renderer.feed(for_stream(text[shown:], sys.stdout)), end="", flush=True)
            shown = len(text)
    end = time.perf_counter()
    text = tokenizer.decode(ids)
    if args.json:
        decode_s = end - (first or end)
        print(json.dumps({
            "text": text,
            "prompt_tokens": len(prompt),
            "new_tokens": len(ids),
            # decode speed: tokens after the first, over the time after the first (prefill is in the TTFT)
            "tokens_per_s": round((len(ids) - 1) / decode_s, 3) if len(ids) > 1 and decode_s > 0 else None,
            "time_to_first_token_s": round((first or end) - start, 4),
        }, ensure_ascii=False))
    else:
        print(renderer.feed(for_stream(text[shown:], sys.stdout)) + renderer.flush())
    return 0
