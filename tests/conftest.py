"""Shared fixtures. Tests run on CPU with small configs; torch threads follow the 2-core machines."""

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core machine make tiny matmuls far slower.

    Opt in per file with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_byte_checkpoint(tmp_path_factory):
    """A random `tiny` float32 model saved with the byte tokenizer (a checkpoint directory, seed 0)."""
    import verse
    from verse import ModelArgs, ReasoningLLM

    tok = verse.load_tokenizer("byte")
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, tokenizer=tok)
    return path


def plus_one_data(path, n: int):
    """`n` "i+1?" -> "Answer: i+1" conversations written to the jsonl file `path` (returned): a verifiable toy task."""
    import json

    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                     {"role": "assistant", "content": f"Answer: {i + 1}"}]}) + "\n"
                            for i in range(n)))
    return path


def sums_data(directory) -> dict:
    """120 "What is a plus b?" conversations with a <think> line (sums.jsonl in `directory`), as a `data:` section
    holding a fifth out for evaluation: a small task SmolLM2 learns in a few steps (the slow training tests)."""
    import json

    records = [{"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"<think>{a} + {b} = {a + b}</think>The answer is {a + b}."}]}
        for a, b in ((i % 37 + 3, i * 7 % 41 + 5) for i in range(120))]
    data = directory / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"sources": [{"path": str(data)}], "eval_fraction": 0.2, "num_workers": 0}


@pytest.fixture
def tiny_args():
    from verse import ModelArgs

    return ModelArgs.from_preset("tiny", dtype="float32")


def pytest_configure(config):
    import os

    # Tests never reach the Hugging Face Hub: offline mode makes Hub lookups fail at once instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Pre-tokenization regexes of the published tokenizer.json files (Qwen2/2.5/3 and Llama 3.x byte-level BPE).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
BPE_CORPUS = ["The answer is 4. Think step by step: two plus two makes four.", "You are a helpful assistant.",
              "def f(x):\n    return x * 2\n", "日本語で？ 😀 はい、できます。", "Hello, how are you today? I'm fine!"]


def write_bpe_tokenizer(directory, family: str, chat_template: str):
    """A small tokenizer directory in the published schema of `family` ("qwen" or "llama3"): tokenizer.json
    (byte-level BPE trained on a few sentences, the family's pre-tokenizer regex, special and added tokens after the
    BPE vocabulary) and tokenizer_config.json with `chat_template`.

    Qwen2.5/Qwen3: NFC normalizer, <|endoftext|> <|im_start|> <|im_end|> special, <tool_call> </tool_call> <think>
    </think> added non-special (as in Qwen3's file), eos <|im_end|>, no BOS. Llama 3.x: <|begin_of_text|> added by
    the post-processor, eos <|eot_id|>.
    """
    import json
    from pathlib import Path

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    llama = family == "llama3"
    tok = Tokenizer(models.BPE(ignore_merges=llama))
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN if llama else QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(BPE_CORPUS * 20, trainer)
    if llama:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIAL])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                  "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
        tok.add_tokens([AddedToken(s, special=False, normalized=False)
                        for s in ("<tool_call>", "</tool_call>", "<think>", "</think>")])
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        config = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
                  "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
                  "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
                  "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return directory


def published_template(name: str) -> str:
    """A published chat template kept in tests/fixtures/chat_templates/NAME.json (qwen2.5-instruct, qwen3,
    llama-3.1-instruct, llama-3.2-instruct)."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "fixtures" / "chat_templates" / f"{name}.json").read_text())[
        "chat_template"]


@pytest.fixture(scope="session")
def published_tokenizers(tmp_path_factory):
    """name -> a tokenizer directory with that published chat template (qwen2.5-instruct, qwen3,
    llama-3.1-instruct, llama-3.2-instruct) over a small tokenizer.json of the family's schema."""
    root = tmp_path_factory.mktemp("published_tokenizers")
    return {name: write_bpe_tokenizer(root / name, "llama3" if name.startswith("llama") else "qwen",
                                      published_template(name))
            for name in ("qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "llama-3.2-instruct")}
