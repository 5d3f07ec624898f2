"""`verse chat`: a terminal chat with history, or the Gradio web UI with `--ui`."""

import argparse

from verse.commands.generate import (add_generation_arguments, check_generation_arguments, execution_overrides,
                                     generation_kwargs)

HELP = "Chat with a model in the terminal (/reset, /system, /save; Ctrl-C stops an answer), or in a web UI (--ui)."
EXAMPLES = """  verse chat model.gguf
  verse chat runs/sft/final --quantize int8          # int8 weights: faster CPU decoding of a dense checkpoint
  verse chat runs/sft/final --system 'You are a careful reasoner.' --temperature 0.7 --top-p 0.95
  verse chat model.gguf --ui                         # http://127.0.0.1:7860
  verse chat base/ --adapter runs/lora/latest --ui    # a LoRA adapter on its base, unmerged
  verse chat model.gguf --ui --host 0.0.0.0 --port 8080   # reachable from other machines
  verse chat model.gguf --ui --slots 8               # up to 8 users answered at once, in one batch
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    parser.add_argument("--ui", action="store_true", help="serve the Gradio chat UI instead of the terminal chat")
    parser.add_argument("--host", default="127.0.0.1", help="UI address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="UI port (default 7860)")
    parser.add_argument("--slots", type=int, default=1,
                        help="UI: replies generated at once; above 1 users' replies decode together in one batch "
                             "(continuous batching, as `verse serve`) (default 1: one at a time)")


def run(args: argparse.Namespace) -> int:
    from verse.infer.chat import ChatSession, terminal_chat
    from verse.infer.runtime import load_for_inference

    check_generation_arguments(args)
    if args.slots < 1:
        from verse.errors import VerseError

        raise VerseError(f"--slots must be >= 1, got {args.slots}")
    model, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype, args.adapter,
                                          **execution_overrides(args))
    generation = generation_kwargs(args)
    if args.ui:
        from verse.infer.ui import serve

        serve(model, tokenizer, host=args.host, port=args.port, system=args.system, generation=generation,
              slots=args.slots)
        return 0
    terminal_chat(ChatSession(model, tokenizer, args.system, generation), think=args.think)
    return 0
