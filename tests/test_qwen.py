"""Qwen2/2.5, Qwen3, Qwen3-MoE and Llama 3.x (issue #19): the ModelArgs fields, Hugging Face directories both ways
against transformers' logits and greedy text, `verse train` SFT, and the presets' parameter counts."""

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.config import count_params
from verse.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=96, max_seq_len=128,
             dtype="float32")


@pytest.mark.parametrize("changes, field", [
    (dict(arch="qwen4"), "arch"),
    (dict(qkv_bias=1), "qkv_bias"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(mlp_only_layers=[0, 2]), "mlp_only_layers"),
    (dict(mlp_only_layers=[True]), "mlp_only_layers"),
    (dict(mlp_only_layers=3), "mlp_only_layers"),
    (dict(attention="mla", qk_norm=True), "qk_norm"),
])
def test_new_fields_are_validated_with_one_line(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelArgs(**{**SMALL, **changes})
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize("changes", [
    dict(qkv_bias=True), dict(qk_norm=True, head_dim=32), dict(tie_embeddings=True),
    dict(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, mlp_only_layers=[1]),
    dict(n_layers=4, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, n_dense_layers=1, moe_layer_freq=2),
])
def test_count_params_matches_the_built_model(changes):
    args = ModelArgs(**{**SMALL, **changes})
    assert count_params(args) == ReasoningLLM(args).num_params()


def test_moe_layers_follow_mlp_only_layers_and_the_sparse_step():
    # Qwen3-MoE: layer i is sparse when i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    args = ModelArgs(**{**SMALL, "n_layers": 6}, n_routed_experts=4, n_activated_experts=2, n_dense_layers=1,
                     moe_layer_freq=2, mlp_only_layers=[3])
    step, only = 2, [3]
    assert [args.is_moe_layer(i) for i in range(6)] == [i not in only and (i + 1) % step == 0 for i in range(6)]


def test_qk_norm_and_bias_are_the_plain_math():
    """One attention layer against its formula written out in torch: per-head RMSNorm of q and k, biases."""
    from verse.model.attention import Attention
    from verse.model.rope import apply_rope, rope_cos_sin

    args = ModelArgs(**SMALL, head_dim=24, qkv_bias=True, qk_norm=True)
    torch.manual_seed(0)
    attn = Attention(args)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 5, args.dim)
    cos, sin = rope_cos_sin(args, args.head_dim, length=5)
    cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)

    def heads(w, norm=None):
        y = (x @ w.weight.T + w.bias).view(2, 5, -1, 24)
        if norm is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + args.norm_eps) * norm.weight
        return y.transpose(1, 2)

    q = apply_rope(heads(attn.wq, attn.q_norm), cos, sin)
    k = apply_rope(heads(attn.wk, attn.k_norm), cos, sin).repeat_interleave(2, dim=1)
    v = heads(attn.wv).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 24 ** 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, -1) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-4, rtol=1e-4)


# ---- Hugging Face directories both ways, against transformers (random-init, fp32) ----

VOCAB = 96
HF_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# family -> (transformers class name, config changes): every variant flag on and off across the cases
HF_CASES = {
    "qwen2-untied": ("Qwen2ForCausalLM", dict()),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3-headdim-tied": ("Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen3-untied": ("Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3moe-norm-topk": ("Qwen3MoeForCausalLM", dict(MOE, head_dim=24, norm_topk_prob=True)),
    "qwen3moe-sparse-step": ("Qwen3MoeForCausalLM", dict(MOE, num_hidden_layers=4, decoder_sparse_step=2,
                                                          norm_topk_prob=False)),
    "qwen3moe-mlp-only": ("Qwen3MoeForCausalLM", dict(MOE, num_hidden_layers=3, mlp_only_layers=[1],
                                                       tie_word_embeddings=True)),
    "llama3.1-rope": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3, rope_theta=500000.0)),
    "llama3.2-tied-headdim": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3, tie_word_embeddings=True, head_dim=32)),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights (norms around 1, biases too) large enough that any mapping mistake moves the logits far."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.dim() == 1 and p.numel() != VOCAB else 0.3 * noise)
    return model.eval()


def make_hf(case: str) -> torch.nn.Module:
    import transformers

    name, changes = HF_CASES[case]
    config_cls = getattr(transformers, name.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    return randomize(getattr(transformers, name)(config_cls(**{**HF_BASE, **changes})).float())


def ids(T: int = 20, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf: torch.nn.Module, prompt: list, n: int = 32) -> list:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_directory_to_verse_and_back(case, tmp_path):
    """transformers dir -> verse.load: same logits and greedy text; Verse's save -> transformers: same class, logits."""
    import verse
    from transformers import AutoModelForCausalLM
    from verse.infer.generate import generate

    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "hf")
    model = verse.load(tmp_path / "hf")
    assert model.args.arch == hf.config.model_type
    assert (model.head.weight is model.embed.weight) == hf.config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    prompt = x[0, :6].tolist()
    assert generate(model, None, [prompt], max_new_tokens=32, stop_ids=[])[0] == hf_greedy(hf, prompt)

    model.save_pretrained(tmp_path / "verse")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "verse").float().eval()
    assert type(back).__name__ == HF_CASES[case][0]
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", [dict(n_dense_layers=1, moe_layer_freq=1), dict(n_dense_layers=0, moe_layer_freq=2),
                                    dict(n_dense_layers=1, moe_layer_freq=2, mlp_only_layers=[3])])
def test_verse_qwen3_moe_layouts_save_as_transformers_layers(layout, tmp_path):
    """A Verse-made Qwen3-MoE whatever its dense/sparse layout: transformers builds the same layers, same logits."""
    from transformers import AutoModelForCausalLM

    args = ModelArgs(**{**SMALL, "n_layers": 4, "vocab_size": VOCAB}, arch="qwen3_moe", qk_norm=True, head_dim=24,
                     n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, norm_topk_prob=True, **layout)
    torch.manual_seed(0)
    model = randomize(ReasoningLLM(args))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
    assert sparse == [args.is_moe_layer(i) for i in range(4)]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch, changes, field", [
    ("qwen2", dict(qkv_bias=True, qk_norm=True), "qk_norm"),
    ("qwen3", dict(qk_norm=False), "qk_norm"),
    ("qwen3", dict(qk_norm=True, sliding_window=8), "sliding_window"),
    ("qwen3_moe", dict(qk_norm=True, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1),
     "n_shared_experts"),
    ("llama", dict(qkv_bias=True), "qkv_bias"),
])
def test_saving_what_the_family_cannot_hold_is_one_clear_error(arch, changes, field, tmp_path):
    model = ReasoningLLM(ModelArgs(**SMALL, arch=arch, **changes))
    with pytest.raises(ConfigError) as err:
        model.save_pretrained(tmp_path / "out")
    assert err.value.field == field and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(model_type="qwen3_moe", decoder_sparse_step=0, num_experts=4, num_experts_per_tok=2,
          moe_intermediate_size=8), "decoder_sparse_step"),
    (dict(model_type="qwen3_moe", mlp_only_layers="0", num_experts=4, num_experts_per_tok=2,
          moe_intermediate_size=8), "mlp_only_layers"),
])
def test_unsupported_qwen_config_json_is_one_clear_error(changes, message, tmp_path):
    import json

    import verse
    from verse.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({**HF_BASE, **changes}))
    with pytest.raises(CheckpointError) as err:
        verse.load(tmp_path)
    assert message in str(err.value) and "config.json" in str(err.value) and "\n" not in str(err.value)


# ---- presets: the published configs (Hub config.json values), counted by transformers on the meta device ----

QWEN = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu")
LLAMA = dict(rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256, num_key_value_heads=8)
PUBLISHED = {  # preset -> (transformers class, config.json of the published model, its published parameter count)
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(QWEN, vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                     max_position_embeddings=32768, tie_word_embeddings=True), 494_032_768),
    "qwen2.5-7b": ("Qwen2ForCausalLM", dict(QWEN, vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                   max_position_embeddings=131072, tie_word_embeddings=False), 7_615_616_512),
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(QWEN, vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                   max_position_embeddings=40960, tie_word_embeddings=True), 596_049_920),
    "qwen3-8b": ("Qwen3ForCausalLM", dict(QWEN, vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                 max_position_embeddings=40960, tie_word_embeddings=False), 8_190_735_360),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(QWEN, vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                      tie_word_embeddings=False), 30_532_122_624),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     head_dim=64, intermediate_size=8192, max_position_embeddings=131072, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                     1_235_814_400),
    "llama-3.1-8b": ("LlamaForCausalLM", dict(LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     intermediate_size=14336, max_position_embeddings=131072, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                     8_030_261_248),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_the_published_model(name):
    """The preset's count equals transformers' count of the published config (built on meta) and the published
    number; the published config.json read by Verse is the preset."""
    import transformers

    from verse.interop.hf import adapter_for

    cls, config, published = PUBLISHED[name]
    hf_config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**config)
    with torch.device("meta"):
        hf = getattr(transformers, cls)(hf_config)
    hf_count = sum(p.numel() for p in hf.parameters())  # tied weights are one parameter
    args = ModelArgs.from_preset(name)
    assert count_params(args) == hf_count == published
    if args.is_moe:  # Qwen3-30B-A3B: "3.3B activated" (model card)
        assert 3.3e9 <= count_params(args, active=True) < 3.4e9
    with torch.device("meta"):
        assert ReasoningLLM(args).num_params() == published
    read = adapter_for(hf_config.model_type, name).args_from_hf({**config, "model_type": hf_config.model_type})
    skip = {"bos_token_id", "eos_token_id"}  # tokenizer ids: from the preset's tokenizer, not the architecture
    assert {k: v for k, v in read.to_dict().items() if k not in skip} == \
        {k: v for k, v in args.to_dict().items() if k not in skip}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_verse_plan_runs_for_each_preset(name, capsys):
    from verse.cli import main

    assert main(["plan", "--preset", name, "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["params"] == PUBLISHED[name][2]


# ---- SFT through the real `verse train` CLI, saved directory read back by transformers ----

@pytest.mark.parametrize("case", ["qwen3-untied", "qwen3moe-norm-topk"])
def test_verse_train_sft_of_a_tiny_qwen3_lowers_the_loss_and_saves_for_transformers(case, tmp_path, capsys):
    import json

    import verse
    from transformers import AutoModelForCausalLM
    from verse.cli import main

    name, changes = HF_CASES[case]
    hf = make_hf_sized(case, vocab_size=verse.load_tokenizer("byte").vocab_size)  # the byte tokenizer's 261 ids
    hf.save_pretrained(tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"add {i} {i + 1}"},
                                                      {"role": "assistant", "content": f"{2 * i + 1}"}]}) + "\n"
                            for i in range(16)))
    assert main(["train", f"model={tmp_path / 'base'}", "mode=sft", "tokenizer=byte", f"out_dir={tmp_path}/run",
                 "max_steps=8", "max_seq_len=64", "micro_batch_size=4", "lr=3e-3", "warmup_steps=1",
                 "precision=fp32", f"data.sources=[{{path: {data}}}]", "data.num_workers=0", "plot=false",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    ckpt = tmp_path / "run" / "latest"
    trained = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    assert type(trained).__name__ == name
    x = ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(trained(x).logits, verse.load(ckpt, dtype="float32")(x), atol=1e-4, rtol=0)
        assert (trained(x).logits - hf(x).logits).abs().max() > 1e-2  # the weights did change
    # `verse generate` on the trained directory: transformers' greedy text (up to the tokenizer's first stop id)
    tok = verse.load_tokenizer(ckpt)
    prompt = tok.encode("add 3 4")
    expected = hf_greedy(trained, prompt, 8)
    expected = expected[:next((i for i, t in enumerate(expected) if t in tok.stop_ids), len(expected))]
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "add 3 4", "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == tok.decode(expected)
    # resuming reads the checkpoint back into the run's model (per-layer `load_into`, experts restacked)
    assert main(["train", "--resume", str(tmp_path / "run"), "max_steps=10", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))


def make_hf_sized(case: str, vocab_size: int) -> torch.nn.Module:
    """`make_hf` with another vocabulary size."""
    import transformers

    name, changes = HF_CASES[case]
    config = getattr(transformers, name.replace("ForCausalLM", "Config"))(**{**HF_BASE, **changes,
                                                                              "vocab_size": vocab_size})
    torch.manual_seed(0)
    return randomize(getattr(transformers, name)(config).float())
