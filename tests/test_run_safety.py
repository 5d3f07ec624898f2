"""`verse train` never loses or overwrites a user's files, survives interrupts, checks its whole config before
anything heavy, and resumes without holding the model twice (issue #20 items 1, 6, 7, 13; issue #13 defects 6, 7)."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse import publish
from verse.errors import VerseError
from verse.train import train
from verse.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parent))
from test_train import Batches, config, make_data  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict:
    """Every entry under `root`: file -> sha256, directory -> "dir", link -> its target (plus inode and mtime)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            kind = "-> " + os.readlink(path)
        elif path.is_dir():
            kind = "dir"
        else:
            kind = hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (kind, st.st_ino, st.st_mtime_ns)
    return found


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def cli_train(*args: str) -> int:
    return main(["train", "--preset", "tiny", "max_steps=1", "max_seq_len=32", "precision=fp32", "plot=false",
                 "tensorboard=false", "data.num_workers=0", *args, "--no-progress"])


@pytest.fixture
def counted_models(monkeypatch):
    """How many `ReasoningLLM`s get built (any device, meta included)."""
    built = []
    init = ReasoningLLM.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ReasoningLLM, "__init__", counting)
    return built


# ---- item 1: a run directory is Verse's own ----

def test_a_new_run_refuses_a_directory_it_did_not_create(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / ".tmp-step-0000001").mkdir(parents=True)
    (user / ".tmp-step-0000001" / "notes.txt").write_text("my notes")
    (user / "config.yaml").write_text("my: own config\n")
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(user)
    err = one_line_error(capsys, cli_train(f"out_dir={user}"))
    assert "not empty" in err and "new directory" in err
    assert snapshot(user) == before


def test_home_and_empty_out_dir_are_refused(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("editor: vim\n")
    before = snapshot(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    assert "out_dir" in one_line_error(capsys, cli_train(f"out_dir={home}"))
    assert "out_dir" in one_line_error(capsys, cli_train("out_dir=~/"))  # the same directory, spelled with ~
    assert "out_dir" in one_line_error(capsys, cli_train("out_dir="))  # would train into the current directory
    assert snapshot(home) == before


def test_a_marked_run_is_continued_only_with_resume(tmp_path, capsys):
    inputs, labels = make_data(64)
    cfg = config(tmp_path, lr=1e30, grad_clip=0.0, schedule="constant", max_steps=30, max_bad_steps=2,
                 micro_batch_size=2, weight_decay=0.0, save_every=100, peak_flops=1e12)
    with pytest.raises(VerseError, match="NaN/inf"):  # stops before its first checkpoint
        train(cfg, loader=Batches(inputs, labels, 2), progress=False)
    run = Path(cfg.out_dir)
    assert ckpt.is_run_dir(run) and not ckpt.list_checkpoints(run)
    before = snapshot(run)
    with pytest.raises(VerseError, match="--resume"):
        train(cfg, loader=Batches(inputs, labels, 2), progress=False)
    assert snapshot(run) == before  # config.yaml not rewritten, metrics.jsonl not appended to


def test_an_empty_directory_becomes_a_run(tmp_path):
    inputs, labels = make_data(4)
    (tmp_path / "run").mkdir()
    result = train(config(tmp_path, max_steps=1), loader=Batches(inputs, labels, 2), progress=False)
    assert ckpt.is_run_dir(result.run_dir) and result.final_dir.name == "step-0000001"


def test_a_run_from_before_the_marker_resumes_and_gets_marked(tmp_path):
    inputs, labels = make_data(8)
    cfg = config(tmp_path, max_steps=2, save_every=1, micro_batch_size=2, peak_flops=1e12)
    train(dataclasses.replace(cfg, max_steps=1), loader=Batches(inputs, labels, 2), progress=False)
    (tmp_path / "run" / ckpt.RUN_MARKER).unlink()  # as an older Verse left it: config.yaml + step-*
    result = train(cfg, resume=True, loader=Batches(inputs, labels, 2), progress=False)
    assert result.step == 2 and ckpt.is_run_dir(result.run_dir)


# ---- item 5: the whole configuration is checked first, nothing is left behind ----

@pytest.mark.parametrize("override, field", [
    ("data.sourcez=[x]", "sourcez"), ("data.sources=[{path: /nonexistent/verse.jsonl}]", "/nonexistent/verse.jsonl"),
    ("data.pack=maybe", "data.pack"), ("model=/nonexistent/model", "model")])
def test_a_bad_data_section_fails_before_the_model_and_leaves_nothing(tmp_path, capsys, counted_models, override,
                                                                       field):
    start = time.perf_counter()
    err = one_line_error(capsys, cli_train(f"out_dir={tmp_path}/run", override))
    assert field in err
    assert time.perf_counter() - start < 5
    assert not counted_models  # no model was built
    assert not (tmp_path / "run").exists()


# ---- item 6: every user error is one line naming the field ----

@pytest.mark.parametrize("override, field", [
    ("out_dir=~", "out_dir"), ("out_dir=5", "out_dir"), ("tokenizer=5", "tokenizer"), ("seed=1e20", "seed"),
    ("seed=100000000000000000000", "seed"), ("data=[1]", "data"), ("lr=.inf", "lr"), ("compile=maybe", "compile"),
    ("device=5", "device"), ("model_overrides=[1]", "model_overrides"), ("data.sources=[1]", "data.sources[0]"),
    ("lr=" + "9" * 400, "lr")])
def test_config_type_errors_name_the_field(tmp_path, capsys, monkeypatch, override, field):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, cli_train(override))
    assert f"{field}:" in err or f"{field}=" in err
    assert not any(tmp_path.iterdir())


def test_out_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "not a directory" in one_line_error(capsys, cli_train(f"out_dir={file}"))
    assert "not a directory" in one_line_error(capsys, cli_train(f"out_dir={file}/run"))
    assert file.read_text() == "mine"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real two-step `verse train` run (CLI, local chat data), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                      {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(8)))
    torch.set_num_threads(1)
    assert cli_train(f"out_dir={root}/run", "max_steps=2", f"data.sources=[{{path: {data}}}]", "keep_last=1") == 0
    return root / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, symlinks=True)
    return target


def test_a_user_directory_named_latest_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "latest").unlink()
    (run / "latest").mkdir()
    (run / "latest" / "keep.txt").write_text("mine")
    before = snapshot(run)
    err = one_line_error(capsys, main(["train", "--resume", str(run), "max_steps=3", "--no-progress"]))
    assert "latest" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate", "json", "shape"])
def test_a_corrupt_training_state_is_one_line(finished_run, tmp_path, capsys, damage):
    run = copy_run(finished_run, tmp_path)
    state = run / "step-0000002" / "train_state"
    if damage == "truncate":
        data = (state / "state.safetensors").read_bytes()
        (state / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "json":
        (state / "state.json").write_text('{"__dict__": {"step": 2')
    else:  # valid JSON, not a training state
        (state / "state.json").write_text('[1, 2, 3]')
    err = one_line_error(capsys, main(["train", "--resume", str(run), "max_steps=3", "--no-progress"]))
    assert "state" in err


# ---- item 2: resuming a finished run saves nothing ----

def test_resuming_a_finished_run_touches_nothing(finished_run, tmp_path, capsys, counted_models):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert snapshot(run) == before  # same files, same inodes, same mtimes: nothing re-saved or deleted
    assert "already finished" in capsys.readouterr().out
    assert not counted_models  # and nothing loaded


def test_a_kill_while_a_step_is_re_saved_never_loses_it(tmp_path, monkeypatch):
    inputs, labels = make_data(4)
    result = train(config(tmp_path, max_steps=1, keep_last=1), loader=Batches(inputs, labels, 2), progress=False)
    run = result.run_dir
    files = {k: v[0] for k, v in snapshot(result.final_dir).items()}
    renames = {"replace": os.replace, "rename": os.rename}

    def killed(real):
        def rename(src, dst, *args):
            if Path(src).name.startswith(".tmp-step-"):  # the new copy would land now: the process dies instead
                raise KeyboardInterrupt
            return real(src, dst, *args)
        return rename

    for name, real in renames.items():
        monkeypatch.setattr(os, name, killed(real))
    monkeypatch.setattr(publish, "_renameat2", killed(publish._renameat2))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 1, ReasoningLLM(ModelArgs.from_preset("tiny")), {"step": 1}, keep_last=1)
    monkeypatch.undo()
    ckpt.clean_partial(run)  # what the next `--resume` does first
    step_dir, step = ckpt.latest_checkpoint(run)
    assert step == 1 and {k: v[0] for k, v in snapshot(step_dir).items()} == files


def test_resume_tidies_what_a_killed_save_left(tmp_path):
    """A kill inside the model writer leaves its staging directory; one inside `publish`'s fallback (no renameat2)
    leaves the step moved aside: the next resume removes the one and puts the other back."""
    inputs, labels = make_data(4)
    result = train(config(tmp_path, max_steps=1), loader=Batches(inputs, labels, 2), progress=False)
    run, step = result.run_dir, result.final_dir
    files = {k: v[0] for k, v in snapshot(step).items()}
    (run / "..tmp-step-0000002.tmp-x1y2").mkdir()
    (run / ".step-0000001.old-a1b2").mkdir()
    os.rename(step, run / ".step-0000001.old-a1b2" / "old")
    ckpt.clean_partial(run)
    assert not list(run.glob("..tmp-*")) and not list(run.glob(".step-*"))
    assert {k: v[0] for k, v in snapshot(step).items()} == files and ckpt.latest_checkpoint(run) == (step, 1)


# ---- item 3: a second Ctrl-C waits for the save, a third aborts ----

SLOW_SAVE_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import Batches, make_data, config
from verse.train import train, checkpoint
from pathlib import Path
save_state = checkpoint.save_state
def slow_save_state(state, directory):
    print("saving", flush=True)
    time.sleep(1.5)  # a big model's save: long enough for impatient Ctrl-Cs
    save_state(state, directory)
checkpoint.save_state = slow_save_state
inputs, labels = make_data(512)
cfg = config(Path({tmp!r}), "run", max_steps=100000, micro_batch_size=2, save_every=0, peak_flops=1e12)
print("started", flush=True)
result = train(cfg, loader=Batches(inputs, labels, 2), progress=False)
print("done", result.step, flush=True)
"""


@pytest.mark.parametrize("interrupts", [2, 3])
def test_a_second_interrupt_waits_for_the_save_and_a_third_aborts(tmp_path, interrupts):
    script = SLOW_SAVE_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().endswith("\n")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # a step is done: the loop (and its handler) is running
        assert proc.stdout.readline().strip() == "saving"
        for _ in range(interrupts - 1):
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    waiting = [line for line in err.splitlines() if "waiting for the checkpoint" in line]
    assert len(waiting) == 1, err
    steps = len(metrics.read_text().splitlines())
    if interrupts == 2:
        assert proc.returncode == 0 and out.splitlines()[-1] == f"done {steps}", err
        step_dir, step = ckpt.latest_checkpoint(tmp_path / "run")
        assert step == steps and ckpt.load_state(step_dir / "train_state")["step"] == steps
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert not ckpt.list_checkpoints(tmp_path / "run")  # aborted: nothing half-written is published
        assert not (tmp_path / "run" / "latest").exists()


# ---- item 4: resume holds the model once ----

def _status() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def test_resume_builds_one_model(tmp_path, counted_models):
    inputs, labels = make_data(8)
    cfg = config(tmp_path, max_steps=2, save_every=1, micro_batch_size=2)
    train(dataclasses.replace(cfg, max_steps=1), loader=Batches(inputs, labels, 2), progress=False)
    counted_models.clear()
    result = train(cfg, resume=True, loader=Batches(inputs, labels, 2), progress=False)
    assert result.step == 2 and len(counted_models) == 1


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_loading_a_checkpoint_adds_at_most_one_layer_of_memory(tmp_path):
    from verse.train.loop import _load_weights

    args = ModelArgs.from_preset("tiny", dim=512, n_layers=8, inter_dim=1536, n_heads=8, n_kv_heads=8, dtype="float32")
    torch.manual_seed(0)
    saved = ReasoningLLM(args)
    saved.save_pretrained(tmp_path / "step")
    weights = sum(t.numel() * t.element_size() for t in saved.state_dict().values())
    reference = {k: v.clone() for k, v in saved.state_dict().items()}
    del saved
    model = ReasoningLLM(args)  # what a fresh start holds
    assert weights > 80 * 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status()["VmRSS"]
    _load_weights(model, tmp_path / "step")
    peak = _status()["VmHWM"] - before
    assert peak < 0.3 * weights, f"loading added {peak / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


# ---- verse plot ----

def test_plot_skips_malformed_metrics_and_checks_out(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "train", "step": 1, "loss": 2.0, "tokens_per_s": 10.0}, "not json", [1, 2],
             {"step": "x", "loss": 1.0}, {"kind": "train", "step": 2, "loss": "high"},
             {"kind": "train", "step": 3, "loss": 1.5, "tokens_per_s": 12.0}]
    (run / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    assert main(["plot", str(run)]) == 0
    captured = capsys.readouterr()
    assert "skipped 4 malformed line(s)" in captured.err
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    err = one_line_error(capsys, main(["plot", str(run), "--out", str(tmp_path / "missing" / "p.png")]))
    assert "does not exist" in err and not (tmp_path / "missing").exists()
