"""GGUF in and out, with transformers' `gguf_file=` loader as the oracle.

Small files are written here in llama.cpp's layout (random weights, every supported tensor type); the real
SmolLM2-135M-Instruct Q4_1 file checks a real model end to end.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import verse
from verse import ModelArgs, ReasoningLLM
from verse.assets import smollm2_gguf
from verse.cli import main
from verse.interop.gguf import save_gguf

Q = gguf.GGMLQuantizationType
DIM, HEADS, KV_HEADS, INTER, VOCAB, CONTEXT = 256, 4, 2, 256, 64, 64  # 256: one K-quant block per row


def random_tensor(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """Random weights stored as `qtype`; K-quants (no numpy quantizer) get random blocks with small scales."""
    w = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16) lead each 144- or 176-byte block
            data[..., 0:2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
            data[..., 2:4] = np.frombuffer(np.float16(5e-5).tobytes(), np.uint8)
        else:  # Q6_K: d (f16) ends each 210-byte block
            data[..., -2:] = np.frombuffer(np.float16(2e-5).tobytes(), np.uint8)
        return data.reshape(rows, -1)
    return gguf.quants.quantize(w, qtype)


def write_gguf(path, qtype=Q.F32, arch="llama", rope_freqs=None, seed=0, tied=False, types=None, vocab=VOCAB):
    """A one-layer Llama GGUF as llama.cpp writes it (tensor names, metadata), random weights of type `qtype`
    (`types`: GGUF tensor name -> type, for the tensors that differ, as in llama.cpp's Q4_K_M mixes)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(DIM)
    writer.add_block_count(1)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    head_dim = DIM // HEADS
    matrices = {"token_embd.weight": (vocab, DIM), "blk.0.attn_q.weight": (DIM, DIM),
                "blk.0.attn_k.weight": (KV_HEADS * head_dim, DIM), "blk.0.attn_v.weight": (KV_HEADS * head_dim, DIM),
                "blk.0.attn_output.weight": (DIM, DIM), "blk.0.ffn_gate.weight": (INTER, DIM),
                "blk.0.ffn_up.weight": (INTER, DIM), "blk.0.ffn_down.weight": (DIM, INTER)}
    if not tied:
        matrices["output.weight"] = (vocab, DIM)
    for name, (rows, cols) in matrices.items():
        kind = (types or {}).get(name, qtype)
        data = random_tensor(rng, rows, cols, kind)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_from_gguf(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()


def tokens(T=20, vocab=VOCAB, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_gguf_tensor_types_match_transformers(qtype, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", qtype, tied=qtype == Q.Q4_1)
    model = verse.load(path, dtype=torch.float32)
    hf = hf_from_gguf(path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    expected_dtype = {Q.F32: torch.float32, Q.F16: torch.float16}.get(qtype, torch.bfloat16)
    assert verse.load(path).embed.weight.dtype == expected_dtype  # dtype=None keeps the file's


def test_gguf_llama3_rope_freqs(tmp_path):
    # llama.cpp's convert_hf_to_gguf.py for Llama 3.1: factor 8, low 1, high 4, original context 8192.
    head_dim = DIM // HEADS
    freqs = 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    path = write_gguf(tmp_path / "m.gguf", rope_freqs=np.array(factors))
    model = verse.load(path)
    assert (model.args.rope_scaling, model.args.rope_factor) == ("llama3", 8.0)
    plain = hf_from_gguf(path)  # transformers ignores rope_freqs: rebuild with the Llama 3.1 config
    config = LlamaConfig(**{**plain.config.to_dict(), "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}})
    config.rope_parameters = config.rope_scaling
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(plain.state_dict())
    x = tokens(T=CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
        assert (model(x) - plain(x).logits).abs().max() > 1e-3  # the scaling matters at this length


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 in Verse and in transformers (float32 both), and transformers' 32-token greedy continuation."""
    path = smollm2_gguf()
    model = verse.load(path, dtype=torch.float32)
    hf = hf_from_gguf(path)
    tok = verse.load_tokenizer(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True)])
    # eos_token_id=-1 (never produced): run all 32 steps instead of stopping at <|im_end|>
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(prompt, generation_config=config, output_logits=True, return_dict_in_generate=True)
        sequence = out.sequences
        # Causal attention: Verse's logits at position t are those of the prefix ending at t, so one forward
        # over prompt + continuation gives the logits of every greedy step.
        ours = model(sequence)[0, prompt.shape[1] - 1:-1]
    return model, tok, prompt, sequence[0, prompt.shape[1]:], torch.cat(out.logits), ours


def test_smollm2_gguf_matches_transformers(smollm2):
    model, tok, prompt, continuation, hf_logits, ours = smollm2
    args = model.args
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.tie_embeddings and prompt.shape[1] > 20
    assert hf_logits.shape == ours.shape == (32, 49152)
    torch.testing.assert_close(ours, hf_logits, atol=1e-3, rtol=0)


def test_smollm2_greedy_continuation_matches_transformers(smollm2):
    model, tok, prompt, continuation, hf_logits, ours = smollm2
    assert continuation.shape == (32,)
    assert hf_logits.argmax(-1).tolist() == continuation.tolist()  # the oracle's generate is greedy
    assert ours.argmax(-1).tolist() == continuation.tolist()
    assert "Paris" in tok.decode(continuation.tolist())


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_export_round_trip(tied, tmp_path):
    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny", dtype="float32", tie_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = ReasoningLLM(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "tiny.gguf"
    save_gguf(model, path)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("verse.")}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.feed_forward_length"]) == (2, 64, 4, 2, 128)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) != tied and "blk.1.ffn_down.weight" in names
    x = tokens(vocab=512)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(hf_from_gguf(path)(x).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(verse.load(path)(x), expected, atol=1e-5, rtol=0)
        save_gguf(model, path, dtype=torch.bfloat16, overwrite=True)
        bf16 = verse.load(path)
        assert bf16.embed.weight.dtype == torch.bfloat16
        torch.testing.assert_close(bf16.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight.bfloat16(),
                                   atol=0, rtol=0)


def test_gguf_export_carries_tokenizer(tmp_path):
    texts = ["The capital of France is Paris.", "What is 2+2? It is 4.", "Reasoning: think, then answer."] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "tok"
    src.mkdir()
    bpe.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}))
    tokenizer = verse.load_tokenizer(src)
    args = ModelArgs.from_preset("tiny", dtype="float32", vocab_size=bpe.get_vocab_size())
    path = tmp_path / "m.gguf"
    save_gguf(ReasoningLLM(args), path, tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    vocab = bpe.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "What is the capital of France? Paris, 2+2."
    assert hf_tok.encode(text, add_special_tokens=False) == bpe.encode(text).ids


def run_cli(capsys, *argv):
    code = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("verse convert: error:")]
    return code, errors, err


def test_cli_rejects_unsupported_gguf(tmp_path, capsys):
    bad_arch = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    code, errors, err = run_cli(capsys, bad_arch, tmp_path / "out")
    assert code == 2 and len(errors) == 1 and "gpt2.gguf" in errors[0] and "architecture 'gpt2'" in errors[0]
    assert "Traceback" not in err

    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", CONTEXT), ("embedding_length", DIM), ("block_count", 1),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, DIM // block * size), np.uint8), raw_dtype=Q.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, errors, _ = run_cli(capsys, path, tmp_path / "out")
    assert code == 2 and len(errors) == 1 and "q8_1.gguf" in errors[0] and "Q8_1" in errors[0]


def test_cli_rejects_truncated_or_corrupt_gguf(tmp_path, capsys):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    (tmp_path / "header.gguf").write_bytes(good[:100])
    for name in ("cut.gguf", "junk.gguf", "header.gguf"):
        code, errors, err = run_cli(capsys, tmp_path / name, tmp_path / "out")
        assert code == 2 and len(errors) == 1 and name in errors[0], (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_converts_gguf_to_hf_and_back(tmp_path, capsys):
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = tokens()
    with torch.no_grad():
        expected = hf_from_gguf(src)(x).logits
        from_dir = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert from_dir.dtype == torch.float32
        torch.testing.assert_close(from_dir(x).logits, expected, atol=1e-4, rtol=1e-4)
        assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.gguf")]) == 0
        torch.testing.assert_close(hf_from_gguf(tmp_path / "back.gguf")(x).logits, expected, atol=1e-4, rtol=1e-4)
