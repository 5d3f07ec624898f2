"""MFU: one formula (6 N + attention per token, active parameters for MoE) everywhere, the peak measured in the
step's own dtype, and a value above 100 % flagged instead of printed."""

import re
from pathlib import Path

import pytest
import torch

from verse.config import ModelArgs
from verse.train.metrics import device_peak_flops, flops_per_token, gpu_key, mfu

SRC = Path(__file__).resolve().parents[1] / "src" / "verse"


def test_dense_formula_matches_hand_computed_value():
    args = ModelArgs.from_preset("tiny")  # vocab 512, dim 64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 128
    layer = 2 * 64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    matmul_params = 64 + 2 * layer + 512 * 64  # final norm, layers, head (the embedding lookup is no matmul)
    attention = 6 * 2 * 4 * (16 + 16) * 32 / 2  # QK^T and AV, forward + backward, causal: half the span
    assert flops_per_token(args, 32) == 6 * matmul_params + attention == 665472
    assert mfu(args, tokens=1000, seconds=2.0, seq_len=32, peak_flops=1e9) == pytest.approx(665472 * 1000 / 2e9)


def test_moe_formula_counts_active_experts_only():
    args = ModelArgs(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, inter_dim=64, max_seq_len=64,
                     n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16, n_dense_layers=1)
    attn = 4 * 32 * 32
    dense_layer = 2 * 32 + attn + 3 * 32 * 64
    moe_layer = 2 * 32 + attn + 3 * 32 * 16 * (2 + 1) + 8 * 32  # 2 routed + 1 shared expert, and the router
    matmul_params = 32 + dense_layer + moe_layer + 100 * 32
    attention = 6 * 2 * 4 * (8 + 8) * 16 / 2
    assert flops_per_token(args, 16) == 6 * matmul_params + attention


def test_mfu_above_one_is_flagged_not_returned():
    args = ModelArgs.from_preset("tiny")
    with pytest.warns(RuntimeWarning, match="above 100 %"):
        assert mfu(args, tokens=1e9, seconds=1.0, seq_len=32, peak_flops=1e9) is None


def test_cpu_peak_is_measured_in_the_requested_dtype(monkeypatch):
    from verse.train import metrics

    metrics._cpu_matmul_flops.cache_clear()
    timed = []
    real_randn = torch.randn

    def randn(*shape, dtype=None, **kwargs):
        timed.append(dtype)
        return real_randn(*shape, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(metrics._cpu_matmul_flops.__wrapped__, "__defaults__", (0.01,))  # time briefly here
    bf16 = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert set(timed) == {torch.bfloat16}
    fp32 = device_peak_flops(torch.device("cpu"), torch.float32)
    assert set(timed) == {torch.bfloat16, torch.float32}
    count = len(timed)
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == bf16  # cached per dtype and thread count
    assert len(timed) == count and bf16 > 0 and fp32 > 0
    metrics._cpu_matmul_flops.cache_clear()


def test_training_divides_by_the_peak_of_its_compute_dtype(tmp_path, monkeypatch):
    from test_train import Batches, config, make_data

    import verse.train.loop as loop
    from verse.train import train

    asked = []
    monkeypatch.setattr(loop, "device_peak_flops", lambda device, dtype: asked.append(dtype) or 1e15)
    inputs, labels = make_data(8)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        result = train(config(tmp_path, precision, precision=precision, max_steps=1), loader=Batches(inputs, labels, 2),
                       progress=False)
        assert asked[-1] == dtype
        record = result.metrics[0]
        expected = record["tokens_per_s"] * flops_per_token(ModelArgs.from_preset("tiny"), 32) / 1e15
        assert record["mfu"] == pytest.approx(expected, rel=1e-3)


def test_every_mfu_goes_through_the_one_function():
    users = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        users[path.relative_to(SRC).as_posix()] = text
    # the per-token FLOPs are computed in metrics.py and only called (the planner's time estimate) elsewhere
    assert [p for p, t in users.items() if "flops_per_token(" in t] == sorted(
        p for p in ("train/metrics.py", "train/planner.py"))
    assert re.search(r"\bmfu\(", users["train/loop.py"]) and re.search(r"\bmfu\(", users["bench/train.py"])
    # nobody divides by a peak on their own; the quickstart card only averages the per-step values
    assert [p for p, t in users.items() if re.search(r"/[ \t]*\(?[\w \t.*\[\]\"']*\bpeak", t)] == ["train/metrics.py"]


def test_one_gpu_table_names_every_device():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "a100-80gb" and gpu_key("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert gpu_key("NVIDIA A10G") == "a10g" and gpu_key("NVIDIA L4") == "l4" and gpu_key("NVIDIA L40S") == "l40s"
    assert gpu_key("NVIDIA H200") == "h200" and gpu_key("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert gpu_key("Tesla V100-SXM2-32GB") == "v100" and gpu_key("Some Future GPU") is None
