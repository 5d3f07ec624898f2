"""Training loop tests: learning, exact gradient accumulation, chunked loss, bitwise resume, faults, config errors."""

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse.errors import VerseError
from verse.train import TrainConfig, train
from verse.train.checkpoint import latest_checkpoint, load_state
from verse.train.loss import chunked_cross_entropy
from verse.train.optim import param_groups
from verse.train.schedule import lr_at

V, T = 512, 32


pytestmark = pytest.mark.usefixtures("one_thread")


class Batches:
    """A tiny in-memory loader in the `verse.data.build_loader` format, with exact-resume state."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, batch: int, stop_after: int = 0):
        self.data, self.labels, self.batch, self.pos = data, labels, batch, 0
        self.stop_after, self.served = stop_after, 0

    def __iter__(self):
        while self.pos + self.batch <= len(self.data):
            sl = slice(self.pos, self.pos + self.batch)
            self.pos += self.batch
            self.served += 1
            if self.served == self.stop_after:  # a SIGTERM arrives while this step runs
                os.kill(os.getpid(), signal.SIGTERM)
            yield {"input_ids": self.data[sl], "labels": self.labels[sl]}
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make_data(n: int = 16, seed: int = 0, masked: bool = False):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    inputs, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    if masked:  # a different number of loss tokens per sequence, as in SFT
        for i in range(n):
            labels[i, : (i * 5) % (T - 2)] = -100
    return inputs, labels


def config(tmp_path: Path, name: str = "run", **changes) -> TrainConfig:
    base = dict(model="tiny", mode="pretrain", out_dir=str(tmp_path / name), max_seq_len=T, precision="fp32",
                plot=False, tensorboard=False, lr=3e-3, max_steps=4, save_every=0)
    return TrainConfig(**{**base, **changes})


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    ours = chunked_cross_entropy(hidden, labels, head, chunk_size=4)
    ours.backward()
    g_ours = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref = F.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours[0], hidden.grad)
    torch.testing.assert_close(g_ours[1], head.weight.grad)


def test_schedules_hand_computed():
    kw = dict(lr=1.0, min_lr=0.1, max_steps=10)
    assert lr_at(0, warmup_steps=2, **kw) == 0.5 and lr_at(1, warmup_steps=2, **kw) == 1.0
    # cosine after 2 warmup steps: progress (step - 2 + 1) / 8
    assert math.isclose(lr_at(5, warmup_steps=2, **kw), 0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))
    assert math.isclose(lr_at(9, warmup_steps=2, **kw), 0.1)
    assert math.isclose(lr_at(5, schedule="linear", **kw), 1.0 - 0.9 * 6 / 10)
    # wsd: constant until the last 20% (steps 8, 9), then linear to min_lr
    assert [lr_at(s, schedule="wsd", **kw) for s in (0, 7)] == [1.0, 1.0]
    assert math.isclose(lr_at(8, schedule="wsd", **kw), 0.55) and math.isclose(lr_at(9, schedule="wsd", **kw), 0.1)


def test_weight_decay_groups(tiny_args):
    model = ReasoningLLM(tiny_args)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, _ in model.named_parameters() if "norm" in n or n.startswith("embed")}
    assert "head.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_tiny_model_overfits_fixed_data(tmp_path):
    inputs, labels = make_data(4)
    cfg = config(tmp_path, max_steps=80, micro_batch_size=4, lr=1e-2, warmup_steps=5, weight_decay=0.0,
                 eval_every=40, eval_batches=1)
    result = train(cfg, loader=Batches(inputs, labels, 4), eval_loader=Batches(inputs, labels, 4), progress=False)
    losses = [m["loss"] for m in result.metrics if m["kind"] == "train"]
    assert losses[0] > 5.5  # ~ln(512) at init
    assert losses[-1] < 0.5, losses[-10:]
    evals = [m for m in result.metrics if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [40, 80] and evals[-1]["eval_loss"] < 0.5


def test_out_of_memory_ends_with_one_message(tmp_path, monkeypatch):
    import verse.train.loop as loop

    def oom(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(loop, "train_step", oom)
    inputs, labels = make_data(4)
    with pytest.raises(VerseError) as info:
        train(config(tmp_path, micro_batch_size=2), loader=Batches(inputs, labels, 2), progress=False)
    message = str(info.value)
    assert "measured peak" in message and "`verse plan` estimate" in message and "\n" not in message
    moves = [message.index(m) for m in ("max_seq_len", "gradient_accumulation_steps", "activation_checkpointing")]
    assert moves == sorted(moves)


def _reference_step(model: ReasoningLLM, inputs, labels, lr: float, clip: float):
    """One plain-torch SGD step on the token-mean loss of the full batch (the oracle).

    SGD keeps the comparison linear in the gradient (Adam's first step, ~sign(g), amplifies float noise)."""
    model = copy.deepcopy(model).train()
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.step()
    return loss.item(), model


def test_gradient_accumulation_equivalence(tmp_path, tiny_args):
    inputs, labels = make_data(8, masked=True)
    common = dict(max_steps=1, lr=1.0, optimizer="sgd", beta1=0.0, weight_decay=0.0, schedule="constant",
                  grad_clip=0.5)
    torch.manual_seed(0)
    init = ReasoningLLM(tiny_args)  # the trainer seeds with cfg.seed=0 the same way
    ref_loss, ref_model = _reference_step(init, inputs, labels, 1.0, 0.5)
    for mb, acc in ((1, 8), (8, 1), (2, 4)):
        cfg = config(tmp_path, f"mb{mb}", micro_batch_size=mb, gradient_accumulation_steps=acc, **common)
        result = train(cfg, loader=Batches(inputs, labels, mb), progress=False)
        assert math.isclose(result.metrics[0]["loss"], ref_loss, rel_tol=1e-5)
        model = _load(result.final_dir)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_equivalence_with_moe_balance_loss(tmp_path):
    inputs, labels = make_data(4, masked=True)
    inputs, labels = inputs % 256, labels.where(labels < 0, labels % 256)  # within bytegpt-tiny's vocabulary
    common = dict(model="bytegpt-tiny", model_overrides={"aux_loss_alpha": 0.5, "dtype": "float32"}, max_steps=1,
                  lr=1.0, optimizer="sgd", beta1=0.0, weight_decay=0.0, schedule="constant", grad_clip=0.0)
    models = []
    for mb, acc in ((2, 1), (1, 2)):
        cfg = config(tmp_path, f"mb{mb}", micro_batch_size=mb, gradient_accumulation_steps=acc, **common)
        models.append(_load(train(cfg, loader=Batches(inputs, labels, mb), progress=False).final_dir))
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def _load(path: Path) -> ReasoningLLM:
    import verse

    return verse.load(path, dtype=torch.float32)


@pytest.mark.parametrize("model, optimizer", [
    ("tiny", "adamw"), ("bytegpt-tiny", "adamw"),  # dense GQA; MLA + MoE with router-bias updates
    pytest.param("tiny", "adamw8bit", marks=pytest.mark.slow)])
def test_resume_after_signal_is_bitwise(tmp_path, model, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("torchao", reason="torchao (8-bit AdamW) is an optional dependency")
    inputs, labels = make_data(16, masked=True)
    inputs, labels = inputs % 256, labels.where(labels < 0, labels % 256)  # within bytegpt-tiny's vocabulary
    cfg = config(tmp_path, "straight", max_steps=6, micro_batch_size=2, gradient_accumulation_steps=2, model=model,
                 warmup_steps=2, optimizer=optimizer, save_every=2, keep_last=2)
    straight = train(cfg, loader=Batches(inputs, labels, 2), progress=False)
    cut = dataclasses.replace(cfg, out_dir=str(tmp_path / "cut"))
    first = train(cut, loader=Batches(inputs, labels, 2, stop_after=7), progress=False)  # SIGTERM in step 4
    assert first.stopped_by_signal and first.step == 4
    second = train(cut, resume=True, loader=Batches(inputs, labels, 2), progress=False)
    losses = [m["loss"] for m in first.metrics + second.metrics]
    assert losses == [m["loss"] for m in straight.metrics]
    steps = sorted(p.name for p in (tmp_path / "cut").glob("step-*"))
    assert steps == ["step-0000004", "step-0000006"]  # keep_last=2
    a, b = _load(straight.final_dir), _load(second.final_dir)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import Batches, make_data, config
from verse.train import train
from pathlib import Path
inputs, labels = make_data(512)
cfg = config(Path({tmp!r}), "killed", max_steps=10000, micro_batch_size=2, save_every=1, keep_last=2)
print("started", flush=True)
train(cfg, loader=Batches(inputs, labels, 2), progress=False)
"""


def test_kill_9_never_leaves_a_corrupt_latest(tmp_path):
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(run_dir.glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(torch.rand(1).item() * 0.5)  # a random moment, most likely mid-save (it saves every step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_dir, step = latest_checkpoint(run_dir)
    assert step >= 1
    state = load_state(step_dir / "train_state")
    assert state["step"] == step
    _load(step_dir)  # the model part is complete too
    cfg = config(tmp_path, "killed", max_steps=step + 2, micro_batch_size=2, save_every=1, keep_last=2)
    inputs, labels = make_data(512)
    result = train(cfg, resume=True, loader=Batches(inputs, labels, 2), progress=False)
    assert result.step == step + 2 and [m["step"] for m in result.metrics] == [step + 1, step + 2]


def test_nan_loss_is_skipped_then_stops(tmp_path):
    inputs, labels = make_data(64)
    cfg = config(tmp_path, lr=1e30, grad_clip=0.0, schedule="constant", max_steps=30, max_bad_steps=3,
                 micro_batch_size=2, weight_decay=0.0)
    with pytest.raises(VerseError, match="NaN/inf for 3 steps in a row"):
        train(cfg, loader=Batches(inputs, labels, 2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 3 and [r["loss"] for r in records[-3:]] == [None, None, None]
    assert math.isfinite(records[0]["loss"])


def test_fused_backward_and_bf16_master_weights_match_plain_adamw(tmp_path):
    inputs, labels = make_data(4)
    common = dict(max_steps=3, micro_batch_size=2, grad_clip=0.0, schedule="constant")
    plain = train(config(tmp_path, "plain", **common), loader=Batches(inputs, labels, 2), progress=False)
    fused = train(config(tmp_path, "fused", fused_backward=True, **common), loader=Batches(inputs, labels, 2),
                  progress=False)
    for a, b in zip(plain.metrics, fused.metrics):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"],
                                                                                  rel_tol=1e-4)
    bf16 = train(config(tmp_path, "bf16", param_dtype="bfloat16", precision="bf16", **common),
                 loader=Batches(inputs, labels, 2), progress=False)
    import verse

    assert verse.load(bf16.final_dir).embed.weight.dtype == torch.bfloat16
    for a, b in zip(plain.metrics, bf16.metrics):
        assert abs(a["loss"] - b["loss"]) < 0.05


@pytest.mark.parametrize("override, field", [
    ("lr=-1", "lr"), ("optimizer=adam9", "optimizer"), ("max_seq_len=100000", "max_seq_len"),
    ("learning_rate=1", "learning_rate"), ("micro_batch_size=0", "micro_batch_size")])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, override, field):
    code = main(["train", "--preset", "tiny", f"out_dir={tmp_path}/r", override, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and field in err and "Traceback" not in err


def test_print_config_lists_every_field(capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"\n{f.name}:" in "\n" + out
    assert all("#" in line for line in out.splitlines() if not line.startswith(" "))
    parsed = yaml.safe_load(out)  # the printout is itself a valid config
    assert TrainConfig.from_dict(parsed).to_dict() == {**TrainConfig().to_dict(), "data": parsed["data"]}


def test_cli_train_and_plot(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                      {"role": "assistant", "content": f"{i} {i} {i}"}]}) + "\n"
                            for i in range(24)))
    args = ["train", "--preset", "tiny", f"out_dir={tmp_path}/run", "max_steps=3", "max_seq_len=64", "precision=fp32",
            f"data.sources=[{{path: {data}}}]", "data.num_workers=0", "data.eval_fraction=0.25", "eval_every=3",
            "eval_batches=1", "plot=false", "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "run" / "latest").resolve().name == "step-0000003"
    assert main(["train", "--resume", str(tmp_path / "run"), "max_steps=5", "--no-progress"]) == 0
    assert (tmp_path / "run" / "latest").resolve().name == "step-0000005"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3),
                                                         ("train", 4), ("train", 5), ("eval", 5)]
    assert all(math.isfinite(r["eval_loss"]) for r in records if r["kind"] == "eval")
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sft_smollm2_lowers_held_out_assistant_loss(tmp_path):
    """SFT of the real SmolLM2-135M (GGUF) on a small masked chat set lowers held-out loss on assistant tokens."""
    import verse
    from verse.assets import smollm2_gguf
    from verse.data import build_loader
    from verse.train.loop import evaluate

    from conftest import sums_data

    gguf = smollm2_gguf()
    data_cfg = sums_data(tmp_path)
    tok = verse.load_tokenizer(str(gguf))
    held_out = build_loader(data_cfg, tok, max_seq_len=128, micro_batch_size=4, seed=0, split="eval")
    cpu = torch.device("cpu")
    no_autocast = torch.autocast("cpu", enabled=False)
    before = evaluate(verse.load(gguf, dtype=torch.float32).train(), held_out, 4, cpu, no_autocast, 4096)
    cfg = config(tmp_path, "sft", mode="sft", model=str(gguf), data=data_cfg, max_seq_len=128, micro_batch_size=4,
                 max_steps=8, lr=1e-4, warmup_steps=2, eval_every=8, eval_batches=4)
    result = train(cfg, progress=False)
    after = [m for m in result.metrics if m["kind"] == "eval"][-1]["eval_loss"]
    assert after < 0.8 * before, (before, after)


def test_sft_needs_a_checkpoint_and_pretrain_sizes_the_vocab_to_the_tokenizer(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "mode=sft", f"out_dir={tmp_path}/r", "--no-progress"]) == 2
    assert "mode=sft" in capsys.readouterr().err
    from verse.train.loop import build_model, load_tokenizer

    cfg = config(tmp_path, model="bytegpt-tiny")
    tok = load_tokenizer(cfg)
    assert tok.name.startswith("byte") and build_model(cfg, torch.device("cpu"), tok).args.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_bf16_stochastic_rounding_and_8bit_adamw_train(tmp_path):
    pytest.importorskip("torchao", reason="stochastic rounding and 8-bit AdamW come from torchao")
    inputs, labels = make_data(8)
    for name, changes in (("sr", dict(param_dtype="bfloat16", bf16_update="stochastic")),
                          ("8bit", dict(optimizer="adamw8bit"))):
        cfg = config(tmp_path, name, max_steps=12, micro_batch_size=4, lr=1e-2, precision="bf16", **changes)
        losses = [m["loss"] for m in train(cfg, loader=Batches(inputs, labels, 4), progress=False).metrics]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, (name, losses)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 3e-4\nmin_lr: 1e-5\nmodel: tiny\n")  # YAML 1.1 would read these as strings
    cfg = TrainConfig.load(str(path), ["eps=1e-6"])
    assert (cfg.lr, cfg.min_lr, cfg.eps) == (3e-4, 1e-5, 1e-6)


def test_preset_runs_as_shipped_on_the_stdlib_corpus(tmp_path):
    """`verse train --preset bytegpt-tiny` needs no data config: the standard library's sources, the preset's
    sequence limit, and bits per byte (= nats per byte token / ln 2) in the metrics."""
    from verse.train.config import default_corpus

    cfg = TrainConfig.load(None, [f"out_dir={tmp_path / 'run'}", "max_steps=2", "max_seq_len=64", "precision=fp32",
                                  "plot=false", "eval_every=0"], preset="bytegpt-tiny")
    assert cfg.mode == "pretrain" and cfg.data["sources"] == [{"path": default_corpus()}]
    assert TrainConfig.load(None, [], preset="bytegpt-tiny").max_seq_len == ModelArgs.from_preset("bytegpt-tiny").max_seq_len
    metrics = train(cfg, progress=False).metrics
    assert all(math.isclose(m["bpb"], m["loss"] / math.log(2)) for m in metrics if m["kind"] == "train")
    # a run directory stands for its latest checkpoint: model and tokenizer alike
    import verse

    run = tmp_path / "run"
    assert verse.load(run).args.tokenizer == "byte" and verse.load_tokenizer(run).name == "byte"
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "3", "--json"]) == 0


@pytest.mark.slow
def test_bytegpt_tiny_pretraining_lowers_bits_per_byte(tmp_path):
    cfg = TrainConfig.load(None, [f"out_dir={tmp_path / 'run'}", "max_steps=40", "eval_every=20", "plot=false"],
                           preset="bytegpt-tiny")
    evals = [m["eval_bpb"] for m in train(cfg, progress=False).metrics if m["kind"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0]


def test_vocab_256_byte_model_trains_and_generates(tmp_path, capsys):
    """ByteGPT's own design: 256 ids, bytes only. The byte tokenizer narrows to it (no special ids)."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                      {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(8)))
    assert main(["train", "--preset", "tiny", "tokenizer=byte", "model_overrides.vocab_size=256",
                 f"out_dir={tmp_path}/r", "max_steps=2", "max_seq_len=128", "precision=fp32", f"data.sources=[{{path: {data}}}]",
                 "data.num_workers=0", "data.shuffle_buffer=4", "plot=false", "--no-progress"]) == 0
    ckpt = tmp_path / "r" / "latest"
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 256
    from verse import load_tokenizer

    tok = load_tokenizer(ckpt)
    assert tok.vocab_size == 256 and tok.eos_id is None
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "say 3", "--chat", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the ChatML prompt as plain bytes, and no EOS id to stop at: all 6 tokens come
    assert out["prompt_tokens"] == len(b"<|im_start|>user\nsay 3<|im_end|>\n<|im_start|>assistant\n")
    assert out["new_tokens"] == 6


def test_tokenizer_with_ids_past_the_model_vocabulary_exits_2(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "tokenizer=o200k", "model_overrides.vocab_size=1000",
                 f"out_dir={tmp_path}/r", "max_steps=1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "o200k" in err[0] and "vocabulary of 1000" in err[0]
