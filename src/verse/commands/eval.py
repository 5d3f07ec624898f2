"""`verse eval`: held-out loss / perplexity on assistant tokens, and exact-match accuracy of final answers."""

import argparse
import json

HELP = ("Evaluate a model on a data source: `loss` = mean cross-entropy and perplexity on the assistant tokens "
        "(the tokens SFT trains on); `exact-match` = greedy replies through the chat template, final answer "
        "extracted by a regex and compared with the reference reply's.")
EXAMPLES = """  verse eval runs/quickstart/final --data runs/quickstart/data/heldout.jsonl
  verse eval runs/quickstart/final --data runs/quickstart/data/heldout.jsonl --task loss --json
  verse eval model.gguf --data data/gsm8k.jsonl --answer-pattern '####\\s*(-?[\\d,.]+)' --limit 200
  verse eval runs/sft/final --data openthoughts --task loss --limit 100     # Hub dataset (needs network)
"""


DEFAULT_MAX_SEQ_LEN = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verse.eval.extract import DEFAULT_PATTERN
    from verse.infer.runtime import DTYPE_CHOICES

    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, HF model directory or .gguf file")
    parser.add_argument("--data", required=True, metavar="FILE_OR_SOURCE",
                        help="local .jsonl/.json/.parquet (OpenThoughts, messages, ultrachat, ... schemas) or a Hub "
                             "name (openthoughts, opencodereasoning, ultrachat, owner/dataset)")
    parser.add_argument("--task", choices=("exact-match", "loss"), default="exact-match",
                        help="exact-match (default) or loss")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--answer-pattern", default=DEFAULT_PATTERN,
                        help=f"regex of the final answer; group 1 (or the match) is compared (default {DEFAULT_PATTERN!r})")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts (exact-match) or rows (loss) per batch")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit (exact-match)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longer records are truncated (loss; default 2048; at most the model's max_seq_len)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the checkpoint's)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapter directory (PEFT format) applied on top of CKPT without merging")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto = the checkpoint's, but float32 on CPUs without native bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from verse.errors import VerseError
    from verse.eval import exact_match, heldout_loss
    from verse.eval.extract import compile_pattern, extract_answer
    from verse.eval.records import eval_data_config, read_conversations, split_prompt
    from verse.infer.runtime import load_for_inference

    for name in ("limit", "batch_size", "max_new_tokens", "max_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VerseError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    pattern = compile_pattern(args.answer_pattern)
    if args.task == "exact-match":
        conversations = read_conversations(args.data, args.limit)
        prompts, references, skipped = [], [], 0
        for conversation in conversations:
            messages, reply = split_prompt(conversation)
            reference = extract_answer(reply, pattern)
            if reference is None:
                skipped += 1
                continue
            prompts.append(messages)
            references.append(reference)
        if not prompts:
            raise VerseError(f"--data {args.data}: no reference reply matches --answer-pattern "
                             f"{args.answer_pattern!r}; set the pattern of your data's final answers")
    model, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype, args.adapter)
    if args.task == "exact-match":
        result = exact_match(model, tokenizer, prompts, references, pattern=args.answer_pattern,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.json)
        out = {"task": "exact-match", "accuracy": result.accuracy, "correct": result.correct, "total": result.total,
               "unanswered": result.unanswered, "skipped_no_reference": skipped, "new_tokens": result.new_tokens,
               "seconds": round(result.seconds, 3)}
        text = (f"exact match: {100 * result.accuracy:.1f}% ({result.correct}/{result.total}; "
                f"{result.unanswered} replies without an answer, {skipped} records without a reference answer)")
    else:
        import sys

        from verse.data import build_loader

        max_seq_len = args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, model.args.max_seq_len)
        if max_seq_len > model.args.max_seq_len:  # positions past it have no RoPE table: clamp, and say so
            print(f"verse eval: --max-seq-len {max_seq_len} exceeds the model's max_seq_len "
                  f"{model.args.max_seq_len}; using {model.args.max_seq_len}", file=sys.stderr)
            max_seq_len = model.args.max_seq_len
        loader = build_loader(eval_data_config(args.data), tokenizer, max_seq_len=max_seq_len,
                              micro_batch_size=args.batch_size, split="eval")
        result = heldout_loss(model, loader, limit=args.limit, progress=not args.json)
        if not result.tokens:
            raise VerseError(f"--data {args.data}: no loss tokens (no usable records with assistant replies)")
        out = {"task": "loss", "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
               "sequences": result.sequences}
        text = (f"held-out loss: {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f} "
                f"({result.tokens} loss tokens in {result.sequences} sequences)")
    print(json.dumps(out) if args.json else text)
    return 0
