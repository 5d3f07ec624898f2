"""`verse plan`: memory components vs hand-computed values, saved-tensor bytes, the 7B goal, and (slow) measurement."""

import dataclasses
import json

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse.train.planner import PlanSettings, plan

# tiny preset: vocab 512, dim 64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 128, untied head
P = 2 * 512 * 64 + 64 + 2 * (2 * 64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # = 139584


def fp32(**kw) -> PlanSettings:
    return PlanSettings(**{"seq_len": 32, "micro_batch_size": 2, "precision": "fp32", "param_dtype": "float32", **kw})


def test_tiny_plan_matches_hand_computed_bytes():
    args = ModelArgs.from_preset("tiny")
    r = plan(args, fp32(), "a100-80gb")
    assert r["params"] == P == 139584
    assert (r["weights_bytes"], r["grads_bytes"], r["optimizer_bytes"]) == (4 * P, 4 * P, 8 * P)
    # saved per layer and token in fp32: 24 D + 16 I + 8 Q + 8 KV + 4 H + 8 = 4376 bytes; 64 tokens, 2 layers,
    # plus ids (8), the final norm's input (4 D), normalized tensor (4 D) and rstd (4) per token, and the RoPE
    # cos and sin tables (fp32, 32 positions x head_dim 16 each)
    rope = 2 * 4 * 32 * 16
    assert r["activations_bytes"] == 2 * 64 * 4376 + 64 * (8 + 8 * 64 + 4) + rope
    ckpt = plan(args, fp32(activation_checkpointing=1), "a100-80gb")
    assert ckpt["activations_bytes"] == 2 * 64 * 4 * 64 + 64 * (8 + 8 * 64 + 4) + rope  # only each layer's input
    assert plan(args, fp32(optimizer="sgd"), "a100-80gb")["optimizer_bytes"] == 4 * P
    # 8-bit AdamW quantizes tensors of >= 4096 values in 256-blocks: embed, head, wq, wo, w1-3 (131072 values)
    big = 2 * 512 * 64 + 2 * (64 * 64 * 2 + 3 * 64 * 128)
    assert plan(args, fp32(optimizer="adamw8bit"), "a100-80gb")["optimizer_bytes"] == (
        2 * big + 2 * 4 * big // 256 + 8 * (P - big))
    master = plan(args, fp32(param_dtype="bfloat16", precision="bf16", bf16_update="master"), "a100-80gb")
    assert (master["weights_bytes"], master["grads_bytes"], master["optimizer_bytes"]) == (6 * P, 4 * P, 8 * P)
    fused = plan(args, fp32(fused_backward=True), "a100-80gb")
    assert fused["grads_bytes"] == 4 * 512 * 64  # only the largest tensor's gradient is ever alive
    assert r["fits"] and not plan(args, fp32(), "a100-80gb", device_memory=r["peak_bytes"] - 1)["fits"]


def to_fp8(model):
    """`model`'s block Linear layers swapped for torchao Float8Linear as `precision: fp8` does (the Hopper check
    skipped: torch runs the float8 GEMMs on CPU too)."""
    from verse.train.fp8 import convert_to_fp8

    assert convert_to_fp8(model, "tensorwise", torch.device("cpu"), check=lambda device: None)
    return model


def saved_activation_bytes(model, ids, autocast: bool) -> int:
    """Bytes autograd saves in the forward to the final norm: unique storages, less the parameters and buffers
    (such as the RoPE tables) and autocast's bf16 copies of fp32 parameters (`weights_bytes` counts those)."""
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    saved = {}

    def is_weight_copy(t):
        flat = (t if t.is_contiguous() else t.mT).contiguous().flatten()
        return t.dtype == torch.bfloat16 and any(p.dtype == torch.float32 and p.numel() == t.numel()
                                                 and torch.equal(p.bfloat16().flatten(), flat)
                                                 for p in model.parameters())

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved and not is_weight_copy(t):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=autocast):
        model.hidden_states(ids)
    return sum(saved.values())


# fp8 with bf16 params only: on CPU torchao does not see autocast (it casts inputs under CUDA's), so fp32 params
# would give it fp32 inputs where a GPU run gives bf16 ones
@pytest.mark.parametrize("dtype, precision", [("float32", "fp32"), ("bfloat16", "bf16"), ("bfloat16", "fp8")])
def test_activation_bytes_match_saved_tensors(tiny_args, dtype, precision):
    """The activation estimate against what autograd really saves. torchao's float8 layers save their bf16 inputs
    (not float8 copies), as bf16 autocast does."""
    torch.manual_seed(0)
    tiny_args = tiny_args.replace(dtype=dtype)
    model = ReasoningLLM(tiny_args).train()
    if precision == "fp8":
        to_fp8(model)
    saved = saved_activation_bytes(model, torch.randint(0, 512, (2, 32)), precision != "fp32")
    estimate = plan(tiny_args, fp32(param_dtype=dtype, precision=precision), "a100-80gb")["activations_bytes"]
    assert abs(estimate / saved - 1) < 0.05


# MoE models: bytegpt-tiny (MLA, a dense first layer; query/key heads 48 wide, values 32: on CPU the values are padded
# to 48 for SDPA's flash kernel, which the plan counts for gpu "cpu"), a DeepSeek-like variant with a query latent, softmax routing without
# groups and equal head widths (CPU's flash kernel saves what CUDA's kernels save), and Qwen3-MoE's layout (GQA with
# q/k norms, no shared expert)
MOE_MODELS = {"bytegpt-tiny": ("bytegpt-tiny", "cpu", dict(n_layers=2)),
              "deepseek-like": ("bytegpt-tiny", "a100-80gb",
                                dict(n_layers=3, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                     v_head_dim=32, score_func="softmax", n_expert_groups=1, n_limited_groups=1,
                                     moe_layer_freq=1)),
              "qwen3-moe": ("qwen3-30b-a3b", "a100-80gb",
                            dict(vocab_size=64, n_layers=2, dim=32, moe_inter_dim=16, n_routed_experts=8, n_heads=4,
                                 n_kv_heads=2, head_dim=8, n_activated_experts=2))}


@pytest.mark.parametrize("model_name", list(MOE_MODELS))
@pytest.mark.parametrize("dtype, precision", [("float32", "fp32"), ("float32", "bf16"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("checkpointing", [0, 1])
def test_moe_activation_bytes_match_saved_tensors(model_name, dtype, precision, checkpointing):
    """MLA's latent norms, per-head q/k concatenations and values, q/k norms, the MoE router, the experts' gathered
    input, hidden tensors and combined output (the terms of `_mla_bytes` / `_moe_bytes`) against autograd's saved
    tensors, with and without activation checkpointing (a checkpointed block saves only its input)."""
    from verse.train.parallelize import apply_ac

    preset, gpu, over = MOE_MODELS[model_name]
    args = ModelArgs.from_preset(preset, dtype=dtype, **over)
    assert args.is_moe
    torch.manual_seed(0)
    model = ReasoningLLM(args).train()
    if checkpointing:
        apply_ac(model, checkpointing)
    saved = saved_activation_bytes(model, torch.randint(0, args.vocab_size, (2, 64)), precision != "fp32")
    settings = fp32(seq_len=64, param_dtype=dtype, precision=precision, activation_checkpointing=checkpointing)
    estimate = plan(args, settings, gpu, device_memory=0)["activations_bytes"]
    assert abs(estimate / saved - 1) < 0.05, (estimate, saved)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_autocast_weight_copies_match_saved_casts(tiny_args, precision):
    """fp32 parameters under bf16 autocast: the plan's weights are the fp32 parameters plus a bf16 copy of every
    matmul weight autocast casts (bf16: all of them; fp8: only the head, torchao's Float8Linear keeps the fp32
    weight itself for backward) -- by hand from the tiny preset, and against the bf16 casts of parameters that a
    forward pass saves."""
    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args.replace(dtype="float32")).train()
    if precision == "fp8":
        to_fp8(model)
    casts = {}

    def pack(t):  # a saved bf16 tensor equal to a parameter cast to bf16 (saved transposed) is autocast's copy
        if t.dtype == torch.bfloat16 and t.dim() == 2 and any(
                p.shape == t.T.shape and torch.equal(p.bfloat16().T, t) for p in model.parameters()):
            casts[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 512, (2, 32)))
    head = 512 * 64
    matmuls = P - 2 * 64 - 3 * 64 - head  # every matrix but the embedding (norms: 2 per layer + the final one)
    expected = 2 * (matmuls if precision == "bf16" else head)
    assert sum(casts.values()) == expected
    r = plan(tiny_args, fp32(precision=precision), "a100-80gb")
    assert r["weights_bytes"] == 4 * P + expected
    assert r["activations_bytes"] == plan(tiny_args, fp32(precision="bf16"), "a100-80gb")["activations_bytes"]


def test_fp8_converts_the_block_matmuls_the_plan_counts():
    """The plan's float8 weights (`_layer_matmul_params`) are the Linear weights `verse.train.fp8` converts."""
    from verse.train.fp8 import fp8_eligible
    from verse.train.planner import _layer_matmul_params

    for preset in ("tiny", "smollm2-135m", "qwen3-30b-a3b"):
        args = ModelArgs.from_preset(preset)
        with torch.device("meta"):
            model = ReasoningLLM(args)
        converted = sum(m.weight.numel() for name, m in model.named_modules() if fp8_eligible(m, name))
        assert converted == _layer_matmul_params(args), preset


def test_mistral_7b_full_finetune_fits_80gb_with_documented_setting():
    args = ModelArgs.from_preset("mistral-7b")
    assert abs(plan(args)["params"] / 7.24e9 - 1) < 0.001
    naive = plan(args, PlanSettings(seq_len=2048, param_dtype="float32", precision="bf16"), "a100-80gb")
    assert not naive["fits"]  # fp32 weights + grads + AdamW alone are 16 bytes x 7.24 B = 116 GB
    documented = PlanSettings(seq_len=2048, micro_batch_size=1, param_dtype="bfloat16", bf16_update="stochastic",
                              optimizer="adamw8bit", fused_backward=True, activation_checkpointing=1)
    r = plan(args, documented, "a100-80gb")
    assert r["fits"] and r["peak_bytes"] < 40 * 2**30
    assert r["weights_bytes"] == 2 * r["params"]


def test_cli_plan_json_and_suggestions(capsys):
    assert main(["plan", "--preset", "mistral-7b", "--seq-len", "2048", "--gpu", "a100-80gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params", "weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes",
                "fits", "step_time_s", "tokens_per_s"):
        assert key in out
    assert not out["fits"] and out["suggestions"]
    first = out["suggestions"][0]["moves"]
    settings = {"--optimizer": None}
    argv = ["plan", "--preset", "mistral-7b", "--seq-len", "2048", "--json"]
    for move in " ".join(first).split():
        key, value = move.split("=")
        flag = "--" + {"activation_checkpointing": "checkpointing"}.get(key, key).replace("_", "-")
        if key == "fused_backward":
            argv.append(flag)
        elif key != "grad_clip" and key not in settings:
            argv += [flag, value]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["fits"]  # following the first suggestion really fits


def test_cli_plan_reads_a_training_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nmax_seq_len: 64\nmicro_batch_size: 3\noptimizer: sgd\nactivation_checkpointing: 1\n")
    assert main(["plan", str(path), "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["seq_len"], settings["micro_batch_size"], settings["optimizer"],
            settings["activation_checkpointing"]) == (64, 3, "sgd", 1)


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--preset", "nope"], ["plan", "--preset", "tiny", "--seq-len",
                                                                          "100000"], ["plan", "/no/such/dir"]])
def test_cli_plan_bad_input_exits_2(capsys, argv):
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value", [("--seq-len", "-5"), ("--seq-len", "0"), ("--micro-batch", "0"),
                                        ("--grad-accum", "-1"), ("--checkpointing", "-1"), ("--mfu", "0"),
                                        ("--mfu", "1.5")])
def test_cli_plan_rejects_non_positive_sizes(capsys, flag, value):
    assert main(["plan", "--preset", "tiny", flag, value]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and f"{flag} {value}" in err


def test_plan_api_rejects_negative_sequence(tiny_args):
    from verse.errors import ConfigError

    with pytest.raises(ConfigError, match="seq_len -5"):
        plan(tiny_args, PlanSettings(seq_len=-5))


# a value other than the default for every PlanSettings field; a new field must be added here (and to the cases)
OTHER_VALUES = {"seq_len": 96, "micro_batch_size": 3, "gradient_accumulation_steps": 2, "optimizer": "sgd",
                "param_dtype": "float32", "precision": "fp32", "bf16_update": "nearest", "activation_checkpointing": 2,
                "fused_backward": True, "loss_chunk_size": 64}


def test_bench_plan_forwards_every_plan_setting():
    from verse.bench.plan_step import train_config
    from verse.train.loop import build_model
    from verse.train.optim import TrainOptimizer

    defaults = PlanSettings()
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(PlanSettings)}
    assert all(getattr(defaults, k) != v for k, v in OTHER_VALUES.items())
    for name, value in OTHER_VALUES.items():  # one field at a time (fused_backward excludes accumulation)
        cfg = train_config(PlanSettings(**{name: value}), "tiny")
        assert getattr(cfg, {"seq_len": "max_seq_len"}.get(name, name)) == value, name
    cfg = train_config(PlanSettings(seq_len=32, activation_checkpointing=2), "tiny", {"dim": 32})
    model = build_model(cfg, torch.device("cpu"))
    assert (model.args.dim, model.args.checkpointing, model.args.checkpoint_every) == (32, True, 2)
    # the update rule reaches the optimizer: fp32 master copies only with bf16_update=master
    for rule, masters in (("master", True), ("stochastic", False), ("nearest", False)):
        if rule == "stochastic":
            pytest.importorskip("torchao")
        cfg = train_config(PlanSettings(seq_len=32, param_dtype="bfloat16", bf16_update=rule), "tiny")
        model = build_model(cfg, torch.device("cpu"))
        assert next(model.parameters()).dtype == torch.bfloat16
        assert (TrainOptimizer(model, cfg).masters is not None) == masters, rule


def test_bench_plan_cases_cover_every_plan_setting():
    from verse.bench.plan import BASE_SETTINGS, PLAN_CASES

    base = {**dataclasses.asdict(PlanSettings()), **BASE_SETTINGS}
    cases = [{**base, **case["settings"]} for case in PLAN_CASES]
    for name in base:
        assert any(case[name] != base[name] for case in cases), f"no case changes {name}"
    rules = {c["bf16_update"] for c in cases if c["param_dtype"] == "bfloat16"}
    assert rules == {"master", "stochastic", "nearest"}


def test_bench_plan_measuring_program_is_a_module():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "verse.bench.plan_step", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "python -m verse.bench.plan_step SPEC_JSON" in out.stdout


@pytest.mark.slow
def test_plan_within_10_percent_of_measured_peak():
    from verse.bench.plan import BASE_MODEL, BASE_SETTINGS, PLAN_CASES, measure

    for case in PLAN_CASES:
        if case["settings"].get("optimizer") == "adamw8bit" or case["settings"].get("bf16_update") == "stochastic":
            pytest.importorskip("torchao")
        result = measure({**BASE_MODEL, **case["model"]}, {**BASE_SETTINGS, **case["settings"]})
        ratio = result["plan"]["peak_bytes"] / result["measured"]
        assert abs(ratio - 1) <= 0.10, (case["name"], ratio)


@pytest.mark.slow
def test_parallel_plan_within_10_percent_of_every_ranks_measured_peak():
    """#14: `verse plan`'s per-rank peak against each rank's measured peak RSS in 2-process gloo runs (FSDP2, TP, EP,
    FSDP2 and TP with checkpointing), `verse bench plan`'s distributed cases."""
    from verse.bench.plan import BASE_MODEL, BASE_SETTINGS, DIST_CASES, measure

    for case in DIST_CASES:
        result = measure({**BASE_MODEL, **case["model"]}, {**BASE_SETTINGS, **case["settings"]},
                         parallel=case["parallel"])
        assert len(result["ranks"]) == 2
        for rank in result["ranks"]:
            assert rank["plan"]["gpus"] == 2
            ratio = rank["plan"]["peak_bytes"] / rank["measured"]
            assert abs(ratio - 1) <= 0.10, (case["name"], rank["rank"], ratio)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any read of weights fails the test: `verse plan CKPT` reads configurations only."""
    import gguf

    import verse.interop.gguf
    import verse.interop.hf

    def fail(*args, **kwargs):
        raise AssertionError("verse plan read weights")

    monkeypatch.setattr(verse.interop.hf, "read_safetensors", fail)
    monkeypatch.setattr(verse.interop.gguf, "dequantize", fail)
    monkeypatch.setattr(gguf, "GGUFReader", fail)


def plan_params(capsys, source) -> int:
    assert main(["plan", str(source), "--seq-len", "32", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["params"]


def test_cli_plan_reads_only_the_config_of_hf_verse_and_run_dirs(tmp_path, capsys, no_weight_reads):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")  # a Hugging Face directory: no verse.json
    assert not (tmp_path / "hf" / "verse.json").exists()
    assert plan_params(capsys, tmp_path / "hf") == hf.num_parameters()
    verse_dir = tmp_path / "run" / "step-0000002"  # a Verse checkpoint in a training run directory
    verse_dir.parent.mkdir()
    ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(verse_dir)
    (tmp_path / "run" / "latest").symlink_to("step-0000002")
    assert plan_params(capsys, verse_dir) == plan_params(capsys, tmp_path / "run") == P


def test_cli_plan_reads_only_the_config_of_deepseek_and_fp8_dirs(tmp_path, capsys, no_weight_reads):
    from test_fp8_cast import deepseek_fp8_checkpoint

    fp8_dir, oracle = deepseek_fp8_checkpoint(tmp_path)
    # transformers keeps DeepSeek-V3's routing bias as a buffer; Verse counts it as a parameter
    expected = oracle.num_parameters() + sum(b.numel() for name, b in oracle.named_buffers()
                                             if name.endswith("e_score_correction_bias"))
    assert plan_params(capsys, fp8_dir) == expected
    assert plan_params(capsys, tmp_path / "by-hand") == expected  # the same model in bf16


def test_cli_plan_reads_only_the_metadata_of_a_gguf(capsys, no_weight_reads):
    import time

    from verse.assets import smollm2_gguf
    from verse.config import count_params

    start = time.perf_counter()
    params = plan_params(capsys, smollm2_gguf())
    assert time.perf_counter() - start < 5  # loading it dequantizes for ~10 s
    # SmolLM2-135M: 30 layers of dim 576, 9 heads of 64, 3 KV heads, SwiGLU 1536, 49152 tied embeddings
    layer = 2 * 576 + 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536
    assert params == 49152 * 576 + 576 + 30 * layer == count_params(ModelArgs.from_preset("smollm2-135m"))


# --- several ranks (`--gpus`, `--parallel`): per-rank memory, layouts, the fewest GPUs --------------------------------


@pytest.mark.parametrize("preset, overrides, degrees", [
    ("tiny", {}, dict(dp_shard=2, tp=2)),
    ("tiny", {}, dict(dp_replicate=2, dp_shard=2)),
    ("bytegpt-tiny", {}, dict(dp_shard=4)),  # MLA + MoE, FSDP2
    ("bytegpt-tiny", {}, dict(dp_shard=2, ep=2)),  # experts split over ep, FSDP2 over dp_shard
    ("bytegpt-tiny", {"vocab_size": 256}, dict(dp_shard=2, tp=2))])  # MLA heads split, experts whole per tp rank
def test_per_rank_parameters_match_the_real_layout(preset, overrides, degrees):
    """The planner's per-rank parameter count against what `parallelize` really leaves on rank 0 (a meta-device
    model laid out by FSDP2/DTensor over a fake 4-rank process group: no communication, no memory)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from verse.train.distributed import MESH_DIMS, Dist, ParallelConfig
    from verse.train.parallelize import parallelize
    from verse.train.planner import _sharding

    layout = ParallelConfig(**degrees)
    world = layout.dp_replicate * layout.dp_shard * layout.tp * layout.ep
    args = ModelArgs.from_preset(preset).replace(**overrides)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", tuple(layout.degrees.values()), mesh_dim_names=MESH_DIMS)
        mesh[("dp_replicate", "dp_shard", "ep")]._flatten("dp")
        mesh[("dp_shard", "ep")]._flatten("dp_shard_ep")
        with torch.device("meta"):
            model = ReasoningLLM(args)
        parallelize(model, Dist(rank=0, world_size=world, parallel=layout, mesh=mesh))
        real = sum(p.to_local().numel() for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
    planned = sum(_sharding(args, layout)["rank_shapes"])
    assert planned == pytest.approx(real, rel=2e-3)  # FSDP2 pads dim 0 to a multiple of the ranks
    fp32 = PlanSettings(precision="fp32", param_dtype="float32", seq_len=32)
    assert plan(args, fp32, parallel=layout)["weights_bytes"] == 4 * planned


def test_parallel_plan_hand_computed_on_tiny():
    """tp=2 halves every matmul, the embedding and the head, not the 5 norms (320 values); dp_shard=2 halves the
    rest; activations: tp halves the heads' and the MLP's part of the bytes per token and layer and (sequence
    parallelism) the norms' part; the loss chunk holds half of the vocabulary's columns."""
    from verse.train.distributed import ParallelConfig

    args = ModelArgs.from_preset("tiny")
    one = plan(args, fp32(), "a100-80gb")
    tp = plan(args, fp32(), "a100-80gb", parallel=ParallelConfig(dp_shard=1, tp=2))
    assert tp["weights_bytes"] == 4 * ((P - 320) // 2 + 320) and tp["optimizer_bytes"] == 2 * tp["weights_bytes"]
    assert tp["gathered_bytes"] == 0  # no FSDP2 with one data-parallel rank
    # per token and layer: 16 D/2 + 8 D + 16 I/2 + 8 Q/2 + 8 KV/2 + 4 H/2 + 8/2 (D 64, I 128, Q 64, KV 32, H 4): the
    # norms run on half of each sequence (sequence parallelism), the matmuls' inputs are gathered whole (as are the
    # RoPE tables of the whole sequence)
    assert tp["activations_bytes"] == (2 * 64 * (8 * 64 + 8 * 64 + 8 * 128 + 4 * 64 + 4 * 32 + 2 * 4 + 4)
                                       + 64 * (8 + 8 * 64 + 4) + 2 * 4 * 32 * 16)
    # the loss chunk: 4 fp32 copies of vocab_size/2 columns (saved logits, log-softmax, its two gradients) + hidden
    assert tp["logits_bytes"] == 64 * 512 // 2 * 4 * 4 + 64 * 64 * 4
    both = plan(args, fp32(), "a100-80gb", parallel=ParallelConfig(dp_shard=2, tp=2))
    assert both["weights_bytes"] == tp["weights_bytes"] // 2 and both["grads_bytes"] == tp["grads_bytes"] // 2
    # FSDP2: the root (embedding + head halved by tp, final norm) and the last block stay gathered into backward
    block = (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) // 2 + 2 * 64
    assert both["gathered_bytes"] == 4 * ((2 * 512 * 64) // 2 + 64 + block)
    assert one["activations_bytes"] == plan(args, fp32(), "a100-80gb",
                                            parallel=ParallelConfig(dp_shard=2))["activations_bytes"]
    assert both["gpus"] == 4 and both["parallel"] == {"dp_replicate": 1, "dp_shard": 2, "ep": 1, "tp": 2}


def test_plan_of_the_issue_layouts(capsys):
    """#14: llama-2-70b full fine-tune on 8 A100-80GB, deepseek-v3-671b on 8 H200 and on 64 H100."""
    # plain AdamW with fp32 master weights: 18 bytes x 69 B = 1.24 TB, more than 8 x 80 GB; the cheapest fix named
    assert main(["plan", "--preset", "llama-2-70b", "--gpus", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"] and out["suggestions"] and all("parallel" in m for m in out["suggestions"])
    assert out["weights_bytes"] == pytest.approx(6 * 68.98e9 / 8, rel=0.01)
    argv = ["plan", "--preset", "llama-2-70b", "--gpus", "8", "--param-dtype", "bfloat16", "--bf16-update",
            "stochastic", "--checkpointing", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dp_shard=8  " in text and "<- smallest that fits" in text.split("dp_shard=8  ")[1].splitlines()[0]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["parallel"] == {"dp_replicate": 1, "dp_shard": 8, "ep": 1, "tp": 1}
    # every split of 8 (tp 1, 2, 4, 8; the rest dp_shard x dp_replicate): replicas come first but hold whole copies
    assert len(out["layouts"]) == 4 + 3 + 2 + 1
    assert next(r for r in out["layouts"] if r["fits"])["parallel"] == out["parallel"]
    # 671 B parameters at >= 6 bytes each (bf16 weights, grads, 8-bit moments) cannot fit 8 x 141 GB: the fewest
    assert main(["plan", "--preset", "deepseek-v3-671b", "--gpu", "h200", "--gpus", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"] and not out["suggestions"]
    assert out["fewest_gpus"]["gpus"] > 8 and out["fewest_gpus"]["peak_bytes"] <= out["device_bytes"]
    assert main(["plan", "--preset", "deepseek-v3-671b", "--gpu", "h100-80gb", "--gpus", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suggestions"] and out["suggestions"][0]["parallel"]["ep"] > 1  # experts split over ranks
    assert main(["plan", "--preset", "deepseek-v3-671b", "--gpu", "h100-80gb", "--parallel", "dp_shard=8,ep=8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 64 and out["comm_time_s"] > 0 and out["step_time_s"] > out["compute_time_s"]


@pytest.mark.parametrize("argv, words", [
    (["--parallel", "dp_shard=2,tp=3"], "tp=3 does not divide"),
    (["--parallel", "dp_shard=2,xp=2"], "expected NAME=INT"),
    (["--parallel", "dp_shard=2", "--gpus", "4"], "--gpus is 4"),
    (["--parallel", "ep=2"], "needs an MoE model"),
    (["--parallel", "tp=0"], "parallel.tp"),
    (["--gpus", "0"], "--gpus 0"),
    (["--parallel", "dp_shard=-1"], "needs --gpus")])
def test_cli_plan_bad_layout_is_one_line(capsys, argv, words):
    assert main(["plan", "--preset", "tiny", "--seq-len", "64", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and words in err


def test_cli_plan_reads_the_configs_parallel_section(tmp_path, capsys):
    """A training config's `parallel:` section is the layout planned (as `verse train` would lay it out); --gpus
    fills its dp_shard=-1; LoRA under a layout is planned over data-parallel ranks only (tp is one line)."""
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nmode: pretrain\nmax_seq_len: 64\nmodel_overrides:\n  vocab_size: 512\n"
                    "parallel:\n  tp: 2\n")
    assert main(["plan", str(path), "--gpus", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parallel"] == {"dp_replicate": 1, "dp_shard": 2, "ep": 1, "tp": 2} and out["gpus"] == 4
    assert main(["plan", str(path)]) == 2
    assert "needs --gpus" in capsys.readouterr().err
    assert main(["plan", str(path), "--parallel", "dp_shard=2", "--json"]) == 0  # the flag wins
    assert json.loads(capsys.readouterr().out)["parallel"]["dp_shard"] == 2
    assert main(["plan", "--preset", "tiny", "--seq-len", "64", "--gpus", "2", "--finetune", "lora", "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert lora["gpus"] == 2 and lora["parallel"]["tp"] == lora["parallel"]["ep"] == 1
    assert main(["plan", str(path), "--gpus", "4", "--finetune", "lora"]) == 2  # the config's tp=2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "data-parallel ranks only" in err


def test_tensor_parallel_never_moves_or_holds_whole_logits():
    """#14: under tp the head's logits stay split by vocabulary (loss_parallel exchanges per-token scalars only): the
    communication time does not grow with the vocabulary, and each rank's loss chunk holds vocab_size / tp columns."""
    from verse.train.distributed import ParallelConfig

    args = ModelArgs.from_preset("tiny")
    tp = ParallelConfig(dp_shard=1, tp=2)
    small, large = (plan(args.replace(vocab_size=v), fp32(), "h100-80gb", parallel=tp) for v in (512, 512 * 64))
    assert large["comm_time_s"] == pytest.approx(small["comm_time_s"], rel=1e-9)
    one = plan(args.replace(vocab_size=512 * 64), fp32(), "h100-80gb")
    assert (large["logits_bytes"] - 64 * 64 * 4) * 2 == (one["logits_bytes"] - 64 * 64 * 4) * 4 / 3
