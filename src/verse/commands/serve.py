"""`verse serve`: an OpenAI-compatible HTTP API over a continuous-batching engine."""

import argparse

from verse.commands.generate import THINKING, add_thinking_argument

HELP = ("Serve a model over HTTP with the OpenAI API shape: /v1/chat/completions and /v1/completions (streaming), "
        "/v1/models, /health. Concurrent requests decode together in one batch; <think> comes back as "
        "reasoning_content.")
EXAMPLES = """  verse serve runs/sft/final                            # http://127.0.0.1:8000/v1
  verse serve model.gguf --port 8080 --slots 16 --max-len 4096
  verse serve base/ --adapter runs/lora/latest --name my-model
  verse serve Qwen3-8B/ --thinking off        # Qwen3 answers without <think> (per request: chat_template_kwargs)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "final", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); print(c.models.list())"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verse.infer.runtime import DTYPE_CHOICES, QUANTIZE_CHOICES
    from verse.infer.serve import MAX_BODY_BYTES

    parser.add_argument("checkpoint", metavar="MODEL", help="checkpoint directory, HF model directory or .gguf file")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapter directory (PEFT format) applied on top of MODEL without merging")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--name", default=None, help="model id clients pass as `model` (default: MODEL's name)")
    parser.add_argument("--slots", default="auto",
                        help="most sequences decoded at once: N, or auto (default): as many KV-cache rows of --max-len "
                             "tokens as fit in half the free memory (RAM, or the GPU's), at most 64")
    parser.add_argument("--max-len", type=int, default=None,
                        help="context per sequence, prompt + completion (default: the model's max_seq_len)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8: weight-only int8 for dense checkpoints (half the bytes of bf16 per token): faster "
                             "decoding of one or a few sequences on CPU, slower prompts and wide batches")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                        help=f"refuse request bodies over this many MiB with a 413 (default {MAX_BODY_BYTES // 2**20})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the checkpoint's)")
    add_thinking_argument(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto = the checkpoint's, but float32 on CPUs without native bf16")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from verse.devices import resolve_device
    from verse.errors import VerseError
    from verse.infer.engine import Engine
    from verse.infer.runtime import load_for_inference
    from verse.infer.serve import create_app

    if not 0 <= args.port < 65536:
        raise VerseError(f"--port must be in 0..65535, got {args.port}")
    if args.slots != "auto" and not (args.slots.isdigit() and int(args.slots) >= 1):
        raise VerseError(f"--slots must be auto or a number >= 1, got {args.slots}")
    if not args.max_body_mb > 0:
        raise VerseError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.max_len is not None and args.max_len < 2:
        raise VerseError(f"--max-len must be >= 2, got {args.max_len}")
    resolve_device(args.device, "--device")
    sock = listen(args.host, args.port)  # before the model loads: a taken port fails in a second, not after it
    model, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype, args.adapter,
                                          thinking=THINKING.get(args.thinking), quantize=args.quantize)
    engine = Engine(model.eval(), tokenizer, args.slots if args.slots == "auto" else int(args.slots), args.max_len)
    name = args.name or Path(args.checkpoint.rstrip("/")).name
    print(f"verse serve: {name} on http://{args.host}:{args.port}/v1 ({engine.slots} slots of {engine.max_len} tokens)",
          flush=True)
    app = create_app(engine, tokenizer, name, int(args.max_body_mb * 2**20))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A socket bound to `host`:`port` (IPv4 or IPv6), or a `VerseError` saying why not."""
    import socket

    from verse.errors import VerseError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise VerseError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock
