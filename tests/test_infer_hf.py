"""Greedy generation equals Hugging Face transformers' `generate` token for token (transformers is the oracle)."""

import pytest
import torch

import verse
from verse.infer import generate, stream

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 17, 99, 4, 250], [1, 300], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_llama(tmp_path, tied):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=tied, rope_theta=10000.0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random init this small makes near-ties; sharpen the logits
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(tmp_path)
    ours = verse.load(tmp_path, dtype=torch.float32)
    expected = [hf_greedy(hf, p, 20) for p in PROMPTS]
    assert generate(ours, None, PROMPTS, max_new_tokens=20, stop_ids=set()) == expected  # batched, left-padded
    assert list(stream(ours, None, PROMPTS[0], max_new_tokens=20, stop_ids=set())) == expected[0]


@pytest.mark.slow
def test_greedy_equals_transformers_smollm2_gguf():
    from verse.assets import smollm2_gguf

    path = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = verse.load(path, dtype=torch.float32)
    tok = verse.load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    assert generate(ours, tok, [prompt], max_new_tokens=32, stop_ids=set()) == [hf_greedy(hf, prompt, 32)]


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_greedy_equals_transformers_deepseek_v3(tmp_path, attn_impl):
    args = verse.ModelArgs(arch="deepseek_v3", vocab_size=512, dim=32, n_layers=3, n_heads=4, inter_dim=48,
                           attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                           moe_inter_dim=16, n_dense_layers=1, score_func="sigmoid", n_expert_groups=4,
                           n_limited_groups=2, route_scale=2.5, norm_topk_prob=True, max_seq_len=128, dtype="float32")
    torch.manual_seed(0)
    model = verse.ReasoningLLM(args)
    with torch.no_grad():
        model.head.weight.mul_(20)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = verse.load(tmp_path, dtype=torch.float32, attn_impl=attn_impl)
    expected = [hf_greedy(hf, p, 16) for p in PROMPTS]
    assert generate(ours, None, PROMPTS, max_new_tokens=16, stop_ids=set()) == expected
