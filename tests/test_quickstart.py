"""verse quickstart: the report card, the train config it writes, and (slow) a real run with its accuracy gain."""

import json
import re
from pathlib import Path

import pytest
import torch

from verse.errors import VerseError
from verse.quickstart.pipeline import QuickstartConfig, prepare_run_dir, record_run, train_config, train_summary
from verse.quickstart.report import card_lines, write_report
from verse.train import TrainConfig

NUMBERS = {"model": "SmolLM2", "device": "cpu", "config": {"n_eval": 50}, "accuracy_before": 0.12,
           "accuracy_after": 0.64, "load_s": 10.2, "eval_before_s": 30.0, "train_s": 250.4, "eval_after_s": 28.0,
           "wall_s": 411.6, "steps": 40, "tokens": 20480,
           "unanswered_before": 41, "unanswered_after": 0, "accuracy_before_last_number": 0.18}


def test_card_has_the_design_lines():
    numbers = {**NUMBERS, **train_summary([
        {"loss": 2.0, "tokens_per_s": 1.0, "mfu": 0.5, "tokens": 512, "peak_memory_bytes": 2**30},
        {"loss": 1.0, "tokens_per_s": 100.0, "mfu": 0.25, "tokens": 1024, "peak_memory_bytes": 3 * 2**30},
        {"loss": 0.5, "tokens_per_s": 200.0, "mfu": 0.35, "tokens": 1536, "peak_memory_bytes": 2 * 2**30}], k=2)}
    lines = card_lines(numbers)
    assert "held-out accuracy: before 12.0% -> after 64.0%" in lines
    assert "wall time: 412 s" in lines
    text = "\n".join(lines)
    assert "+52.0 points on 50 held-out problems" in text
    assert "train loss: 1.500 -> 0.750" in text and "min 0.500" in text  # means of the first / last 2 steps
    assert "throughput: 150 tokens/s, MFU 30.0%" in text  # the first (warm-up) step is left out
    assert "peak memory: 3.00 GiB" in text
    assert "replies without an 'Answer: N' line: before 41, after 0" in text
    assert "last number of its reply: 18.0%" in text


def test_report_markdown(tmp_path):
    samples = [{"question": "Start with 2. Add 3, then multiply by 2. What is the result?", "reference": "10",
                "before": "It is 8.", "before_correct": False, "after": "<think>...</think>\nAnswer: 10",
                "after_correct": True}]
    text = write_report(tmp_path / "report.md", NUMBERS, samples).read_text()
    assert "held-out accuracy: before 12.0% -> after 64.0%" in text and "wall time: 412 s" in text
    assert "![loss curve](loss_curve.png)" in text
    assert "before (wrong)" in text and "after (correct)" in text
    assert f"verse chat {tmp_path / 'final'} --ui" in text
    assert "openthoughts" in text


def test_train_config_is_a_valid_verse_train_config(tmp_path):
    cfg = QuickstartConfig(lr=1e-4, micro_batch_size=3, max_seq_len=200, seed=7)
    mapping = train_config(cfg, tmp_path, "model.gguf", steps=12, device=torch.device("cpu"), peak_flops=5e10)
    train_cfg = TrainConfig.from_dict(mapping)
    assert (train_cfg.mode, train_cfg.model, train_cfg.max_steps, train_cfg.lr) == ("sft", "model.gguf", 12, 1e-4)
    assert (train_cfg.micro_batch_size, train_cfg.max_seq_len, train_cfg.seed) == (3, 200, 7)
    # CPUs without native bf16 (most) train in fp32: their bf16 matmuls are emulated
    precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert (train_cfg.precision, train_cfg.param_dtype, train_cfg.peak_flops) == (precision, "float32", 5e10)
    assert train_cfg.out_dir == str(tmp_path / "train")
    assert train_cfg.data["sources"][0]["path"] == str(tmp_path / "data" / "train.jsonl")
    assert train_cfg.data["eval_sources"][0]["path"] == str(tmp_path / "data" / "heldout.jsonl")


def test_run_dir_is_replaced_only_when_it_is_a_quickstart(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(VerseError, match="not a quickstart run"):
        prepare_run_dir(other)
    assert (other / "precious.txt").read_text() == "keep"
    previous = tmp_path / "qs"
    assert prepare_run_dir(previous) == previous
    (previous / "train.yaml").write_text("old")
    (previous / "final").mkdir()
    (previous / "final" / "model.safetensors").write_bytes(b"old weights")
    record_run(previous, {"status": "running"})  # as an interrupted run leaves it
    (previous / "old.txt").write_text("mine")  # a user's files, beside and inside the run's own entries
    (previous / "data").mkdir()
    (previous / "data" / "notes.txt").write_text("mine too")
    with pytest.raises(VerseError, match="notes.txt is not among the files the earlier quickstart recorded"):
        prepare_run_dir(previous)
    assert (previous / "data" / "notes.txt").read_text() == "mine too"
    (previous / "data" / "notes.txt").unlink()
    assert prepare_run_dir(previous) == previous
    assert sorted(p.name for p in previous.iterdir()) == ["old.txt", "quickstart.json"]  # the old run is gone
    assert (previous / "old.txt").read_text() == "mine"
    (previous / "quickstart.json").write_text("{}")  # a marker recording no files: nothing is deleted
    with pytest.raises(VerseError, match="records no list of files"):
        prepare_run_dir(previous)
    assert (previous / "old.txt").read_text() == "mine"


def test_rerun_deletes_only_what_the_quickstart_wrote(tmp_path, monkeypatch):
    """`verse quickstart --out DIR` twice, the first run interrupted: the second removes exactly the files the first
    recorded (in its own entries, `train/` and `final/` included) and leaves a user's files byte for byte."""
    import verse.quickstart.pipeline as pipeline
    from verse.cli import main

    out = tmp_path / "qs"

    def interrupted(cfg, run_dir, progress, log):
        (run_dir / "data").mkdir()
        (run_dir / "data" / "train.jsonl").write_text("{}\n")
        (run_dir / "train" / "step-0000001").mkdir(parents=True)
        (run_dir / "train" / "step-0000001" / "model.safetensors").write_bytes(b"weights")
        (run_dir / "train" / "latest").symlink_to("step-0000001")
        (run_dir / "train.yaml").write_text("max_steps: 1\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run", interrupted)
    assert main(["quickstart", "--out", str(out)]) == 130
    recorded = json.loads((out / "quickstart.json").read_text())
    assert recorded["status"] == "failed" and recorded["files"] == [
        "data/train.jsonl", "train.yaml", "train/latest", "train/step-0000001/model.safetensors"]
    (out / "mine.txt").write_text("a user's notes")
    (out / "data" / "mine").mkdir()  # a user's directory inside the quickstart's own entry
    (out / "data" / "mine" / "x.txt").write_text("x")
    with pytest.raises(VerseError, match="mine/x.txt is not among the files"):
        prepare_run_dir(out)
    assert (out / "data" / "mine" / "x.txt").read_text() == "x"
    (out / "data" / "mine" / "x.txt").rename(out / "x.txt")
    (out / "data" / "mine").rmdir()
    seen = {}

    def finished(cfg, run_dir, progress, log):
        seen["entries"] = sorted(p.name for p in run_dir.iterdir())
        raise VerseError("stop here")

    monkeypatch.setattr(pipeline, "_run", finished)
    assert main(["quickstart", "--out", str(out)]) == 2
    assert seen["entries"] == ["mine.txt", "quickstart.json", "x.txt"]  # the old run gone, the user's files kept
    assert (out / "mine.txt").read_text() == "a user's notes" and (out / "x.txt").read_text() == "x"


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    """The real thing, smaller: SmolLM2-135M learns the task (+25 points held-out) and the report says so."""
    from transformers import AutoModelForCausalLM

    from verse.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--n-eval", "32", "--budget-s", "0", "--steps", "30"]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((out / "quickstart.json").read_text())
    assert numbers["accuracy_after"] - numbers["accuracy_before"] >= 0.25
    line = (f"held-out accuracy: before {100 * numbers['accuracy_before']:.1f}% -> "
            f"after {100 * numbers['accuracy_after']:.1f}%")
    report = (out / "report.md").read_text()
    assert line in printed and line in report
    assert re.search(r"^wall time: \d+ s$", printed, re.MULTILINE)
    assert numbers["loss_last"] < numbers["loss_first"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert TrainConfig.load(str(out / "train.yaml")).max_steps == numbers["steps"] == 30
    assert f"verse chat {out / 'final'}" in printed
    # the saved model is a transformers checkpoint
    hf = AutoModelForCausalLM.from_pretrained(out / "final")
    assert isinstance(hf, torch.nn.Module) and Path(out / "final" / "tokenizer.json").is_file()


def test_train_config_with_lora_is_a_valid_finetune_section(tmp_path):
    """`verse quickstart --finetune lora|qlora`: adapters of rank 16 on every projection, the adapters' default lr."""
    for method in ("lora", "qlora"):
        mapping = train_config(QuickstartConfig(finetune=method), tmp_path, "model.gguf", steps=12,
                               device=torch.device("cpu"))
        cfg = TrainConfig.from_dict(mapping)
        assert cfg.finetune_method == method and cfg.lr == 1e-3
        assert (cfg.lora_args().rank, cfg.lora_args().alpha, cfg.lora_args().targets) == (16, 32.0, ("all",))
    assert TrainConfig.from_dict(train_config(QuickstartConfig(), tmp_path, "m.gguf", 3, torch.device("cpu"))).lr \
        == 2e-4


@pytest.mark.slow
def test_quickstart_with_lora_passes_its_bar(tmp_path, capsys):
    """`verse quickstart --finetune lora`: the same bar (+25 points held-out), the base GGUF untouched, final/ merged."""
    from transformers import AutoModelForCausalLM

    from verse.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--n-eval", "32", "--budget-s", "0", "--steps", "30",
                 "--finetune", "lora"]) == 0
    numbers = json.loads((out / "quickstart.json").read_text())
    assert numbers["accuracy_after"] - numbers["accuracy_before"] >= 0.25, numbers
    assert (out / "train" / "latest" / "adapter_config.json").is_file()
    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "final"), torch.nn.Module)
