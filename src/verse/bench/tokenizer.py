"""`verse bench tokenize`: tokens/s of Verse's `encode_batch` vs tiktoken directly and vs the `tokenizers` library.

The text is real, offline and varied enough: Python's standard-library sources (code, English comments and
docstrings), cut into documents, plus multilingual lines, up to --mb megabytes.
"""

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, List

MULTILINGUAL = ("日本語のテキストと中文文本，還有한국어 문장。 مرحبا بالعالم، كيف حالك؟ Привет, мир! नमस्ते दुनिया "
                "😀👍🏽 1234567890 3.14159\n")


def bench_corpus(megabytes: float, doc_chars: int = 4000) -> List[str]:
    """About `megabytes` MB of UTF-8 text as documents of about `doc_chars` characters.

    Args:
        megabytes: total size.
        doc_chars: characters per document.

    Returns:
        List[str]: the documents.
    """
    budget = int(megabytes * 1e6)
    docs: List[str] = []
    size = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for start in range(0, len(text), doc_chars):
            doc = text[start:start + doc_chars] + (MULTILINGUAL if len(docs) % 8 == 0 else "")
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= budget:
                return docs
    return docs


def _time(fn: Callable[[], List[List[int]]], repeat: int) -> Dict[str, object]:
    best, ids = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        ids = fn()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "tokens": sum(map(len, ids)), "ids": ids}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `verse bench tokenize`."""
    parser.add_argument("--tokenizer", default="o200k", help="o200k, byte, a tokenizer.json dir or a .gguf file")
    parser.add_argument("--mb", type=float, default=10.0, help="megabytes of text (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation; the best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Encode the corpus with each implementation, check they agree, print throughput and ratios.

    Returns:
        int: 0 when every implementation produced the same ids, 1 otherwise.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer as HFBackend
    from tqdm import tqdm

    from verse.tokenization import load_tokenizer
    from verse.tokenization.o200k import O200kTokenizer

    tok = load_tokenizer(args.tokenizer)
    docs = bench_corpus(args.mb)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    threads = os.cpu_count() or 1
    impls = {"verse": lambda: tok.encode_batch(docs)}
    if isinstance(tok, O200kTokenizer):
        impls["tiktoken"] = lambda: tok.enc.encode_ordinary_batch(docs, num_threads=threads)
    backend = HFBackend.from_str(tok.to_tokenizer_json())
    backend.encode_special_tokens = True
    impls["tokenizers"] = lambda: [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]

    results = {}
    for name, fn in tqdm(impls.items(), desc="bench tokenize", file=sys.stderr, disable=args.json):
        results[name] = _time(fn, args.repeat)
    same = all(r["ids"] == results["verse"]["ids"] for r in results.values())
    ours = results["verse"]["seconds"]
    rows = [{"impl": name, "seconds": round(r["seconds"], 4), "tokens": r["tokens"],
             "tokens_per_s": round(r["tokens"] / r["seconds"]), "mb_per_s": round(megabytes / r["seconds"], 2),
             "verse_speedup": round(r["seconds"] / ours, 3)} for name, r in results.items()]
    report = {"tokenizer": tok.name, "megabytes": round(megabytes, 2), "documents": len(docs), "threads": threads,
              "identical_ids": same, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"encode_batch on {megabytes:.1f} MB ({len(docs)} documents), {tok.name}, {threads} threads, "
              f"best of {args.repeat}; ids identical: {same}")
        print(f"{'impl':<12}{'seconds':>10}{'tokens/s':>14}{'MB/s':>9}{'verse speedup':>15}")
        for row in rows:
            print(f"{row['impl']:<12}{row['seconds']:>10.3f}{row['tokens_per_s']:>14,}{row['mb_per_s']:>9.2f}"
                  f"{row['verse_speedup']:>14.2f}x")
    return 0 if same else 1
