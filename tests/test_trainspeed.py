"""Training speed (issue #16): `verse bench train` against transformers, a step without host-device syncs whose
losses match a plain PyTorch loop, the FLOPs of a tied head, and FP8 training's refusal and wiring."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from verse.config import ModelArgs
from verse.model import ReasoningLLM
from verse.train.config import TrainConfig
from verse.train.loop import step_tensors, train_step
from verse.train.metrics import flops_per_token
from verse.train.optim import TrainOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0) -> ReasoningLLM:
    torch.manual_seed(seed)
    return ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32")).train()


def _batch(B: int = 2, T: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 512, (B, T + 1), generator=g)
    return {"input_ids": seq[:, :-1], "labels": seq[:, 1:].clone()}


def test_tied_head_is_counted_as_a_matmul():
    # SmolLM2-135M: the tied 49152 x 576 matrix is the head's matmul (only the embedding lookup is free)
    args = ModelArgs.from_preset("smollm2-135m")
    layer = 2 * 576 + 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536  # norms, q, k+v, o, SwiGLU
    matmul_params = 576 + 30 * layer + 49152 * 576
    attention = 6 * 30 * 9 * (64 + 64) * 512 / 2
    assert flops_per_token(args, 512) == 6 * matmul_params + attention


class _SyncCounter:
    """Counts the calls that make the host wait for the device: Tensor.item/tolist/__bool__/__int__/__float__
    and torch.cuda.synchronize."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap("cuda.synchronize", lambda *a, **k: None))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted


def test_step_makes_no_host_sync(monkeypatch):
    model = _tiny()
    cfg = TrainConfig(max_seq_len=16, micro_batch_size=2, gradient_accumulation_steps=2, precision="bf16")
    optimizer = TrainOptimizer(model, cfg)
    micro = [_batch(seed=0), _batch(seed=1)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    counter = _SyncCounter(monkeypatch)
    out = step_tensors(model, optimizer, micro, cfg, autocast)
    assert counter.calls == []
    monkeypatch.undo()
    assert bool(out.applied) and int(out.n_tokens) == 64
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the update ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_step_makes_no_host_sync_on_cuda():
    """On a GPU, CUDA itself reports every synchronizing call (`set_sync_debug_mode("error")` raises on one)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32")).train()
    cfg = TrainConfig(max_seq_len=16, micro_batch_size=2, gradient_accumulation_steps=2, precision="bf16")
    optimizer = TrainOptimizer(model, cfg)
    micro = [{k: v.cuda() for k, v in _batch(seed=i).items()} for i in range(2)]
    step_tensors(model, optimizer, micro, cfg, cfg.autocast(torch.device("cuda")))  # warm-up: lazy tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step_tensors(model, optimizer, micro, cfg, cfg.autocast(torch.device("cuda")))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(out.applied)


def test_non_finite_step_is_skipped_on_the_device():
    model = _tiny()
    cfg = TrainConfig(max_seq_len=16, micro_batch_size=2, precision="fp32")
    optimizer = TrainOptimizer(model, cfg)
    with torch.no_grad():
        model.embed.weight[7] = float("inf")
    batch = _batch()
    batch["input_ids"][0, 3] = 7
    before = copy.deepcopy(model.state_dict())
    loss_sum, n_tokens, grad_norm, applied = train_step(model, optimizer, [batch], cfg, torch.autocast("cpu",
                                                                                                      enabled=False))
    assert (loss_sum, grad_norm, applied, n_tokens) == (None, None, False, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(int(s["step"]) == 0 for s in optimizer.optimizers[0].state.values())


@pytest.mark.parametrize("chunk", [8, 4096])
def test_losses_and_weights_match_a_plain_torch_loop(chunk):
    """Three steps of `train_step` (chunked CE, fused AdamW, clipping) against the textbook loop: full logits,
    F.cross_entropy (mean over the loss tokens), clip_grad_norm_, torch.optim.AdamW (for-loop implementation)."""
    ours, ref = _tiny(), _tiny()
    cfg = TrainConfig(max_seq_len=16, micro_batch_size=2, precision="fp32", weight_decay=0.0, grad_clip=0.5,
                      lr=1e-2, loss_chunk_size=chunk)
    optimizer = TrainOptimizer(ours, cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=0.0, foreach=False)
    off = torch.autocast("cpu", enabled=False)
    for step in range(3):
        batch = _batch(seed=step)
        batch["labels"][1, :5] = -100  # SFT-style masked prompt positions
        loss_sum, n_tokens, _, applied = train_step(ours, optimizer, [batch], cfg, off)
        logits = ref(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        ref_opt.step()
        ref_opt.zero_grad()
        assert applied and n_tokens == 27
        assert loss_sum / n_tokens == pytest.approx(loss.item(), rel=1e-5)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=name)  # Adam: tiny grads amplify rounding


@pytest.mark.parametrize("chunk, calls", [(4096, 1), (16, 4)])
def test_one_loss_chunk_is_not_recomputed(chunk, calls):
    """32 loss tokens: one chunk runs the head once; two chunks of 16 run it twice each (forward, and again in
    backward under checkpointing)."""
    model = _tiny()
    cfg = TrainConfig(max_seq_len=16, micro_batch_size=2, precision="fp32", loss_chunk_size=chunk)
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].size(0)))
    train_step(model, TrainOptimizer(model, cfg), [_batch()], cfg, torch.autocast("cpu", enabled=False))
    assert len(seen) == calls and sum(seen) == 32 * calls // (1 if chunk > 32 else 2)


def test_bench_train_rows_and_json_keys(capsys):
    pytest.importorskip("transformers")
    import argparse

    from verse.bench import train as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--seq-len", "16", "--micro-batch", "1", "--steps", "1",
                              "--warmup", "0", "--json"])
    assert bench.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tokens_per_s"]) == set(report["mfu"]) == {"verse", "transformers"}
    assert report["ratio"] == pytest.approx(report["tokens_per_s"]["verse"] / report["tokens_per_s"]["transformers"])
    assert set(report["rows"]) == {"dense", "moe"}
    for row in report["rows"].values():
        for side in ("verse", "transformers"):
            r = row[side]
            assert r["tokens_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] <= 1)
        # the same weights and tokens: transformers computes Verse's first loss (bf16 autocast on both)
        assert row["verse"]["first_loss"] == pytest.approx(row["transformers"]["first_loss"], abs=2e-2)
    assert report["device_name"]


def test_bench_train_bad_option_is_one_line():
    import argparse

    from verse.bench import train as bench
    from verse.errors import VerseError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(VerseError, match="--preset bytegpt-tiny: the dense row needs a Llama-type preset"):
        bench.run(parser.parse_args(["--preset", "bytegpt-tiny"]))
    with pytest.raises(VerseError, match="--steps must be >= 1"):
        bench.run(parser.parse_args(["--steps", "0"]))


def test_fp8_refuses_on_cpu_in_one_line_before_writing(tmp_path, capsys):
    from verse.cli import main

    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "max_steps=1", "max_seq_len=32", "precision=fp8", "device=cpu",
                 f"out_dir={out}", "plot=false", "tensorboard=false", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "precision=fp8 needs an NVIDIA GPU of compute capability 9.0" in err and "use precision=bf16" in err
    assert not out.exists()


def test_fp8_refuses_an_older_gpu(monkeypatch):
    from verse.train.fp8 import fp8_unsupported

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    reason = fp8_unsupported(torch.device("cuda"))
    assert "A100-SXM4-80GB is compute capability 8.0" in reason


@pytest.mark.parametrize("preset, recipe", [("tiny", "tensorwise"), ("bytegpt-tiny", "rowwise")])
def test_fp8_converts_the_block_linears_only(preset, recipe):
    """The wiring, with the capability check passed by hand: CPU cannot run these layers, so nothing runs."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.config import ScalingGranularity

    from verse.train.fp8 import convert_to_fp8

    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset(preset, dtype="float32"))
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    expected = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and name.startswith("layers.") and ".gate" not in name
                      and m.in_features % 16 == 0 and m.out_features % 16 == 0)
    converted = convert_to_fp8(model, recipe, torch.device("cpu"), check=lambda device: None)
    assert sorted(converted) == expected and expected
    modules = dict(model.named_modules())
    granularity = ScalingGranularity.AXISWISE if recipe == "rowwise" else ScalingGranularity.TENSORWISE
    for name in expected:
        assert isinstance(modules[name], Float8Linear)
        assert modules[name].config.cast_config_input.scaling_granularity == granularity
        assert torch.equal(modules[name].weight, weights[name])  # the same fp32 master weights
    assert not isinstance(model.head, Float8Linear)
    if preset == "bytegpt-tiny":  # MLA projections convert; routers and grouped experts stay
        assert any(".attn." in n for n in converted) and not any(".ffn.experts" in n or ".gate" in n
                                                                   for n in converted)


def test_fp8_with_lora_is_refused_at_validation(tmp_path):
    from verse.errors import ConfigError

    with pytest.raises(ConfigError, match="precision: fp8 trains every weight"):
        TrainConfig(precision="fp8", finetune={"method": "lora"}).validate()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="FP8 training needs an NVIDIA GPU of compute capability 9.0+")
def test_fp8_loss_curve_tracks_bf16_on_hopper(tmp_path):
    """DeepSeek-V3's bound: the FP8 loss curve within 0.25 % of bf16's (here the mean of the last 50 of 300 steps
    of a small Llama on the same data)."""
    from verse.train import train
    from test_train import Batches

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 512, (64, 257), generator=g) % 97  # a learnable, repetitive distribution
    inputs, labels = seq[:, :-1], seq[:, 1:]
    curves = {}
    for precision in ("bf16", "fp8"):
        cfg = TrainConfig(model="tiny", out_dir=str(tmp_path / precision), max_seq_len=256, micro_batch_size=8,
                          max_steps=300, precision=precision, device="cuda", plot=False, tensorboard=False,
                          save_every=0, model_overrides={"dim": 256, "n_heads": 4, "n_kv_heads": 4,
                                                         "inter_dim": 768, "n_layers": 4})
        result = train(cfg, loader=Batches(inputs, labels, 8), progress=False)
        curves[precision] = [r["loss"] for r in result.metrics if r.get("kind") == "train"]
    bf16, fp8 = (sum(c[-50:]) / 50 for c in (curves["bf16"], curves["fp8"]))
    assert abs(fp8 - bf16) / bf16 < 0.0025, (bf16, fp8)


def test_cpu_step_memory_counts_reused_small_tensors():
    """A step of small tensors (heap-allocated, like the MoE row's) measured twice: the second must still count
    the ~50 MiB it holds at once (it read 0 MiB when the first step's freed heap pages stayed resident)."""
    from verse.bench.train import _step_memory

    def step():
        held = [torch.ones(16, 256) for _ in range(3200)]  # 3200 x 16 KiB
        return sum(len(x) for x in held)

    for _ in range(2):
        measure = _step_memory()
        step()
        used = measure()
        if used is None:
            pytest.skip("no /proc/self/clear_refs: the resident high-water mark cannot be reset here")
    assert used >= 0.8 * 3200 * 16 * 256 * 4


def test_torchao_import_says_nothing():
    """transformers' loader imports torchao (bench train's twins) and so may Verse (8-bit AdamW): quietly, no
    'Failed to load ..._C_...so' or pytree register_constant lines reach the user."""
    pytest.importorskip("torchao")
    pytest.importorskip("transformers")
    import subprocess
    import sys

    code = ("import torch; from verse.config import ModelArgs; from verse.model import ReasoningLLM; "
            "from verse.bench.train import transformers_twin; from verse.optional import import_torchao; "
            "import_torchao('torchao.optim'); "
            "[transformers_twin(ReasoningLLM(ModelArgs.from_preset(p, dtype='float32')), torch.device('cpu')) "
            "for p in ('tiny', 'bytegpt-tiny')]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr and "register_constant" not in out.stderr, out.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident size needs Linux /proc")
def test_freed_memory_stays_for_reuse_inside_the_block_and_is_returned_after():
    """glibc hands a freed 64 MiB tensor's pages back at once (its own mmap) by default; inside
    `reuse_freed_memory` they stay resident for the next allocation, and leaving the block returns them. In a fresh
    interpreter: a long-lived process's heap may already hold a free chunk that large (then glibc serves it from
    there and keeps it by default too)."""
    import subprocess
    import sys

    code = """
import torch
from pathlib import Path
from verse.train.heap import _glibc, reuse_freed_memory

def rss():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmRSS:"))

def held_after_free():
    x = torch.ones(16 * 2**20)  # 64 MiB, touched: resident
    before = rss()
    del x
    return before - rss()  # what the free gave back

if _glibc() is None:
    print("skip")
else:
    default = held_after_free()
    with reuse_freed_memory():
        inside = held_after_free()
        rss_inside = rss()
    print(default, inside, rss_inside - rss(), held_after_free())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc: the block does nothing here")
    default, inside, returned, after = (int(x) for x in out)
    size = 64 * 2**20
    assert default > 0.9 * size  # the default: returned at free
    assert inside < 0.1 * size  # kept in the heap
    assert returned > 0.9 * size  # returned on exit
    assert after > 0.9 * size  # and the default is back


def test_bench_train_child_side_failure_is_one_line(tmp_path):
    """transformers' side runs in a child process on CPU; when it cannot load its model, one line says so."""
    pytest.importorskip("transformers")
    from verse.bench.train import _ChildSide
    from verse.errors import VerseError
    from verse.train.config import TrainConfig

    cfg = TrainConfig(max_seq_len=8, micro_batch_size=1, device="cpu")
    with pytest.raises(VerseError, match=r"^verse bench train: the transformers side failed: \w+"):
        _ChildSide("transformers", tmp_path / "missing", torch.float32, cfg, torch.zeros(1, 8, dtype=torch.long))
