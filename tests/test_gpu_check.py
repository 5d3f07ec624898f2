"""scripts/gpu_check.py, the prepared GPU check: its dry run (every section, tiny shapes on the CPU) must keep
working, so that a session lent a GPU gets numbers, not a traceback."""

import json
import subprocess
import sys
from pathlib import Path


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
    assert fsdp["fsdp2_wrapped"] is True and fsdp["backend"] == "gloo" and fsdp["same_first_loss"] is True
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
