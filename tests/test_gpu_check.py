"""scripts/gpu_check.py, the prepared GPU check: its dry run (every section, tiny shapes on the CPU) must keep
working, so that a session lent a GPU gets numbers, not a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = {"decode", "decode_restart", "train", "distributed", "lora", "cuda_tests"}


def test_dry_run_runs_every_section_and_writes_the_json(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and set(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"))
        assert section["rows"], name
        errors = [row for row in section["rows"] if "error" in row]
        assert not errors, (name, errors)
    rows = {name: {row["name"]: row for row in s["rows"]} for name, s in result["sections"].items()}
    assert rows["decode"]["tiny verse eager"]["decode_tok_s"] > 0
    assert rows["decode"]["tiny verse compiled"]["skipped"].startswith("skipped: no CUDA")
    assert rows["train"]["tiny 2x32 eager"]["verse_tokens_per_s"] > 0
    fsdp = rows["distributed"]["tiny 2x32 FSDP2 world 1"]
    assert fsdp["fsdp2_wrapped"] is True and fsdp["backend"] == "gloo"
    assert rows["distributed"]["tiny 2x32 one device"]["same_first_loss"] is True
    assert rows["distributed"]["tiny DCP save + load"]["weights_identical"] is True
    assert rows["lora"]["tiny lora 1x32"]["tokens_per_s"] > 0
    assert "tests/test_fp8.py::test_triton_matches_reference_on_cuda" in rows["cuda_tests"]["found"]["ids"]
    # one table row per measurement on stdout
    assert "| tiny verse eager" in out.stdout and "gpu_check.json" in out.stdout


def test_a_section_over_its_cap_is_recorded_and_the_next_still_runs(tmp_path):
    """A section stopped at its cap keeps the rows it had, names what it was doing, and does not stop the run."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "distributed", "cuda_tests",
                          "--out", str(tmp_path), "--cap", "distributed=1"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["distributed"]["status"] == "timeout"
    assert sections["distributed"]["error"].startswith("stopped at its cap of 1 s")
    assert sections["cuda_tests"]["status"] == "ok" and sections["cuda_tests"]["rows"]
    assert "| section timeout" in out.stdout


def test_cuda_only_tests_are_found_by_their_skip():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    found = gpu_check.cuda_only_tests()
    assert "tests/test_trainspeed.py::test_step_makes_no_host_sync_on_cuda" in found
    assert "tests/test_trainspeed.py::test_fp8_loss_curve_tracks_bf16_on_hopper" in found
    assert all(not t.endswith("test_fp8_with_lora_is_refused_at_validation") for t in found)
    # a skipif written inside a string (this file's pytest-output test) is no test's decorator
    assert not [t for t in found if t.startswith("tests/test_gpu_check.py")]


def test_pytest_outcomes_are_read_from_pytests_own_output(tmp_path):
    """The cuda_tests section reads each test's outcome from the streamed `pytest -v -rfEs` output (so a run stopped
    at its cap keeps what finished): checked against a real pytest run of known outcomes."""
    (tmp_path / "test_known.py").write_text(
        "import pytest\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\n"
        "def test_skips():\n    pass\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_param(n):\n    assert n == 1\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", "test_known.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    outcomes = gpu_check.pytest_outcomes(out.stdout)
    assert {k: v["outcome"] for k, v in outcomes.items()} == {
        "test_known.py::test_passes": "passed", "test_known.py::test_fails": "failed",
        "test_known.py::test_skips": "skipped", "test_known.py::test_param": "failed"}
    assert "one is not two" in outcomes["test_known.py::test_fails"]["message"]
    assert outcomes["test_known.py::test_skips"]["message"] == "needs a CUDA GPU"


def test_bench_train_fp8_where_it_cannot_run_is_one_line(capsys):
    """The GPU check's fp8 row runs `verse bench train --precision fp8`; without a Hopper GPU (and torchao) that is
    one line naming what is missing, before any model is built."""
    from verse.cli import main

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("fp8 training runs on this GPU (the GPU check measures it)")
    assert main(["bench", "train", "--precision", "fp8", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precision=fp8 needs an NVIDIA GPU of compute capability 9.0" in err[0]


def test_bench_generate_warms_up_on_the_timed_runs_cache_size(monkeypatch):
    """A compiled decode step is one graph per cache size: the warm-up must decode with the timed run's length (its
    cache bucket), else the timed run compiles. Both calls of `decode_steps` ask for the same number of tokens, and
    the warm-up stops after a few of them."""
    import importlib

    from verse import ModelArgs, ReasoningLLM
    from verse.bench.generate import bench_verse

    generate = importlib.import_module("verse.infer.generate")  # (the package's `generate` is the function)

    calls, real = [], generate.decode_steps

    def recording(model, prompts, max_new_tokens, *args, **kwargs):
        calls.append({"max_new_tokens": max_new_tokens, "taken": 0})
        for token in real(model, prompts, max_new_tokens, *args, **kwargs):
            calls[-1]["taken"] += 1
            yield token

    monkeypatch.setattr(generate, "decode_steps", recording)

    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny")).eval()
    result, tokens = bench_verse(model, [1, 2, 3], 12)
    assert [c["max_new_tokens"] for c in calls] == [12, 12]
    assert calls[0]["taken"] == 4 and calls[1]["taken"] == 12 == len(tokens)
    assert result["warmup_s"] > 0
