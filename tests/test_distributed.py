"""Training on several processes (torchrun, gloo on CPU): the same losses as one process, sharded checkpoints that
resume on another number of ranks, the `parallel:` section, `python -m verse`."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import verse
from verse.cli import main
from verse.errors import ConfigError
from verse.train import TrainConfig
from verse.train.distributed import ParallelConfig

WORKER = Path(__file__).parent / "fixtures" / "dist_worker.py"
SRC = str(Path(__file__).resolve().parents[1] / "src")


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n ARGS` (a free port of its own), failing the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def one_process(out: Path, model: str, steps: int, *overrides: str) -> list:
    """The worker's run in this process (the reference the ranks must reproduce)."""
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    argv = sys.argv
    sys.argv = [str(WORKER), str(out), model, str(steps), *overrides]
    try:
        worker.main()
    finally:
        sys.argv = argv
    return json.loads((out / f"losses-{'resume' if overrides[:1] == ('resume',) else 'run'}-1.json").read_text())


def losses(out: Path, world: int, tag: str = "run") -> list:
    return json.loads((out / f"losses-{tag}-{world}.json").read_text())


TP = "parallel.tp=2 parallel.dp_shard=1"


@pytest.mark.parametrize("model, layout, ranks", [
    ("tiny", "parallel.dp_shard=2", 2),  # FSDP2
    # tensor parallel: column/row-split attention and MLP, vocab-split embedding and head (tied: one parameter)
    pytest.param("tiny", TP + " model_overrides.tie_embeddings=true", 2, marks=pytest.mark.slow),
    pytest.param("tiny", TP, 2, marks=pytest.mark.slow),
    pytest.param("tiny", "parallel.dp_shard=2 parallel.cpu_offload=true", 2, marks=pytest.mark.slow),  # CPU: no-op
    pytest.param("bytegpt-tiny", "parallel.dp_shard=2", 2, marks=pytest.mark.slow),  # FSDP2, MLA + MoE
    pytest.param("bytegpt-tiny", "parallel.dp_replicate=2", 2, marks=pytest.mark.slow),  # DDP-like (HSDP, shard 1)
    pytest.param("bytegpt-tiny", TP, 2, marks=pytest.mark.slow),  # MLA heads split, shared RoPE key
    pytest.param("tiny", "parallel.tp=2 parallel.dp_shard=2", 4, marks=pytest.mark.slow),  # FSDP2 + TP
    # expert parallel: each rank holds 4 of the 8 experts, all-to-all dispatch (dense weights FSDP2 over ep)
    pytest.param("bytegpt-tiny", "parallel.ep=2 parallel.dp_shard=1", 2, marks=pytest.mark.slow),
    pytest.param("bytegpt-tiny", "parallel.ep=2 parallel.dp_shard=2", 4, marks=pytest.mark.slow),  # + FSDP2 experts
    pytest.param("bytegpt-tiny", "parallel.ep=2 parallel.tp=2 parallel.dp_shard=1", 4, marks=pytest.mark.slow),
    pytest.param("bytegpt-tiny", "parallel.ep=2 parallel.dp_replicate=2 parallel.dp_shard=1", 4,
                 marks=pytest.mark.slow),  # EP + HSDP (experts replicated over dp_replicate)
    # activation checkpointing recomputes the dispatch (its all-to-alls) in backward
    pytest.param("bytegpt-tiny", "parallel.ep=2 parallel.dp_shard=1 activation_checkpointing=1", 2,
                 marks=pytest.mark.slow)])
def test_ranks_match_one_process(tmp_path, model, layout, ranks):
    """N ranks, each data-parallel rank with its part of the global batch == 1 process with the whole batch, for 5
    steps (fp32, within 1e-5): same init (built on meta, initialised per shard), global token normalisation, summed
    gradients, global clip norm over every mesh, MoE balance loss and router-bias update over all ranks."""
    ref = one_process(tmp_path / "one", model, 5, *[o for o in layout.split() if not o.startswith("parallel.")])
    torchrun(ranks, str(WORKER), str(tmp_path / "two"), model, "5", *layout.split(), timeout=400)
    assert losses(tmp_path / "two", ranks) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "two" / "run").iterdir())
    # `verse convert RUN_DIR OUT` gathers the DCP shards into the single HF-loadable directory: the weights one
    # process trained, and (dense: LlamaForCausalLM) the logits transformers computes from them
    out = tmp_path / "export"
    assert main(["convert", str(tmp_path / "two" / "run"), str(out)]) == 0
    exported, single = verse.load(out), verse.load(tmp_path / "one" / "run")
    for (name, p), q in zip(exported.state_dict().items(), single.state_dict().values()):
        # Adam turns float noise in a near-zero gradient into an lr-sized step (a few elements ~1e-3 off); a misplaced
        # shard is off by the weights' own size (~0.02) nearly everywhere
        diff = (p - q).abs()
        assert diff.mean() < 1e-4 and diff.max() < 1e-2, (name, diff.mean(), diff.max())
    if model == "tiny":
        from transformers import AutoModelForCausalLM

        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, exported(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_and_four_ranks(tmp_path):
    """Saved by 2 FSDP2 ranks at step 3 (DCP, in parallel), resumed on 1 and on 4 ranks: steps 4-5 have the losses
    of an uninterrupted single-process run; the checkpoint exports to an HF-loadable directory."""
    ref = one_process(tmp_path / "one", "tiny", 5)
    two = tmp_path / "two"
    torchrun(2, str(WORKER), str(two), "tiny", "3", "parallel.dp_shard=2")
    assert losses(two, 2) == pytest.approx(ref[:3], rel=1e-5, abs=1e-5)
    step = two / "run" / "step-0000003"
    assert (two / "run" / "latest").resolve() == step.resolve() and (step / "dcp" / ".metadata").is_file()
    four = tmp_path / "four"
    shutil.copytree(two, four, symlinks=True)
    assert one_process(two, "tiny", 5, "resume") == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)
    torchrun(4, str(WORKER), str(four), "tiny", "5", "resume", timeout=400)
    assert losses(four, 4, "resume") == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)


def _step_ids(out: Path, world: int, accum: int, tag: str = "run") -> list:
    """The example ids each step trained on: every rank's micro-batches of the step together (none twice)."""
    ranks = [json.loads((out / f"ids-{tag}-{world}-{r}.json").read_text()) for r in range(world)]
    steps = []
    for s in range(len(ranks[0]) // accum):
        ids = [i for batches in ranks for batch in batches[s * accum:(s + 1) * accum] for i in batch]
        assert len(ids) == len(set(ids)), (s, ids)
        steps.append(sorted(ids))
    return steps


@pytest.mark.slow
def test_data_position_resumes_exactly_on_another_number_of_ranks(tmp_path):
    """#14: Verse's own loader (packed rows of a jsonl file): 2 ranks train on the examples one process with the
    whole global batch trains on, step by step; saved at step 3, the run resumes on 1 rank (accumulating 2
    micro-batches) and on 4 (micro-batch 1), 4 rows a step throughout: steps 4-5 see exactly the examples of the
    uninterrupted run (none twice, none skipped) and have its losses (fp32, 1e-5)."""
    records = [{"text": f"#{i:04d} " + "abcdefghij"[:i % 11] * (1 + i % 2)} for i in range(300)]  # 6-27 bytes
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = "data=" + json.dumps({"sources": [{"path": str(tmp_path / "ids.jsonl")}], "num_workers": 0})
    ref = one_process(tmp_path / "one", "tiny", 5, data, "micro_batch_size=4")  # the whole global batch
    ref_ids = _step_ids(tmp_path / "one", 1, 1)
    seen = [i for step in ref_ids for i in step]
    assert len(ref_ids) == 5 and len(seen) == len(set(seen)) >= 25  # packed: several examples a row
    two = (data, "parallel.dp_shard=2", "micro_batch_size=2")
    torchrun(2, str(WORKER), str(tmp_path / "full"), "tiny", "5", *two)
    assert _step_ids(tmp_path / "full", 2, 1) == ref_ids
    assert losses(tmp_path / "full", 2) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    cut = tmp_path / "cut"
    torchrun(2, str(WORKER), str(cut), "tiny", "3", *two)
    assert _step_ids(cut, 2, 1) == ref_ids[:3]
    four = tmp_path / "four"
    shutil.copytree(cut, four, symlinks=True)
    resumed = one_process(cut, "tiny", 5, "resume", data, "micro_batch_size=2", "gradient_accumulation_steps=2")
    assert _step_ids(cut, 1, 2, "resume") == ref_ids[3:]
    assert resumed == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)
    torchrun(4, str(WORKER), str(four), "tiny", "5", "resume", data, "parallel.dp_shard=4", "micro_batch_size=1",
             timeout=400)
    assert _step_ids(four, 4, 1, "resume") == ref_ids[3:]
    assert losses(four, 4, "resume") == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_on_one_process(tmp_path):
    """Saved by 2 expert-parallel ranks at step 3 (each its 4 of the 8 experts), resumed on one process: steps 4-5
    have the losses of an uninterrupted single-process run."""
    ref = one_process(tmp_path / "one", "bytegpt-tiny", 5)
    two = tmp_path / "two"
    torchrun(2, str(WORKER), str(two), "bytegpt-tiny", "3", "parallel.ep=2", "parallel.dp_shard=1")
    assert losses(two, 2) == pytest.approx(ref[:3], rel=1e-5, abs=1e-5)
    assert one_process(two, "bytegpt-tiny", 5, "resume") == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)


def test_parallel_section_is_validated():
    assert ParallelConfig.from_dict({"dp_shard": 2, "tp": 2}).resolve(4).degrees == {
        "dp_replicate": 1, "dp_shard": 2, "ep": 1, "tp": 2}
    assert ParallelConfig.from_dict({}).resolve(8).dp_shard == 8  # dp_shard=-1: every rank left over
    with pytest.raises(ConfigError, match=r"parallel\.tp: must be a positive integer, got 0"):
        TrainConfig.load(None, ["parallel.tp=0"])
    with pytest.raises(ConfigError, match=r"parallel: unknown key\(s\) fsdp"):
        TrainConfig.load(None, ["parallel.fsdp=2"])
    assert TrainConfig.load(None, ["parallel.ep=2"]).parallel == {"ep": 2}
    with pytest.raises(ConfigError, match="must equal the number of ranks.*WORLD_SIZE=4"):
        ParallelConfig.from_dict({"dp_shard": 3}).resolve(4)


def test_tensor_parallel_needs_divisible_widths():
    from verse import ModelArgs, ReasoningLLM
    from verse.train.distributed import Dist
    from verse.train.parallelize import apply_tp

    with torch.device("meta"):
        model = ReasoningLLM(ModelArgs.from_preset("tiny"))
    with pytest.raises(ConfigError, match=r"parallel.tp=3 must divide n_heads=4, vocab_size=512, inter_dim=128, n_kv_heads=2: "):
        apply_tp(model, Dist(parallel=ParallelConfig(tp=3, dp_shard=1)))


@pytest.mark.parametrize("model", ["bytegpt-tiny", pytest.param("qwen3-30b-a3b", marks=pytest.mark.slow)])
def test_expert_parallel_dispatch_splits_experts(tmp_path, model):
    """ep=2 (all-to-all around the experts): each rank holds only its 4 of the 8 experts (the one-process values),
    its outputs are one process's on its own batch, and its experts' gradients are one process's summed over both
    ranks' batches (tokens of the other rank reached them), and its saved activations are the plan's. DeepSeek
    MLA+MoE and (tiny) Qwen3-MoE."""
    torchrun(2, str(Path(__file__).parent / "fixtures" / "ep_worker.py"), str(tmp_path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok-0.json", "ok-1.json"]


@pytest.mark.parametrize("model", ["tiny", pytest.param("bytegpt-tiny", marks=pytest.mark.slow)])
def test_sequence_parallel_and_vocab_parallel_loss(tmp_path, model):
    """tp=2: between blocks each rank holds half of every sequence (sequence-parallel norms), the head's logits stay
    split by vocabulary (each rank vocab_size/2 columns) and the chunked loss runs on them with loss_parallel; the
    loss and every gradient are plain cross-entropy's on one process; a length tp does not divide is one line."""
    torchrun(2, str(Path(__file__).parent / "fixtures" / "tp_worker.py"), str(tmp_path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok-0.json", "ok-1.json"]


def test_expert_parallel_needs_moe_layers_and_divisible_experts():
    from verse import ModelArgs, ReasoningLLM
    from verse.train.distributed import Dist
    from verse.train.parallelize import apply_ep

    with torch.device("meta"):
        dense = ReasoningLLM(ModelArgs.from_preset("tiny"))
        moe = ReasoningLLM(ModelArgs.from_preset("bytegpt-tiny"))
    with pytest.raises(ConfigError, match=r"^parallel.ep=2 splits MoE experts, but this model has no MoE layer: "):
        apply_ep(dense, Dist(parallel=ParallelConfig(ep=2, dp_shard=1)))
    with pytest.raises(ConfigError, match=r"^parallel.ep=3 must divide n_routed_experts=8: "):
        apply_ep(moe, Dist(parallel=ParallelConfig(ep=3, dp_shard=1)))


def test_optimizer_state_of_sharded_ranks_steps_on_one_process():
    """Sharded ranks save a foreach (not fused) AdamW; resumed on one process, its groups say fused=None, and the
    step must take the host path (a fused-only found_inf made torch's foreach AdamW raise). Oracle: torch's AdamW."""
    from verse import ModelArgs, ReasoningLLM
    from verse.train.optim import TrainOptimizer, param_groups

    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", n_layers=1))
    ref = copy.deepcopy(model)
    cfg = TrainConfig(precision="fp32", weight_decay=0.0)
    optimizer = TrainOptimizer(model, cfg)
    saved = torch.optim.AdamW(param_groups(ref, 0.0), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              foreach=True)
    optimizer.torch_optimizer().load_state_dict(saved.state_dict())
    ids = torch.randint(0, 512, (2, 8))
    for m in (model, ref):
        m(ids).float().pow(2).mean().backward()
    optimizer.step(skip=torch.tensor(False))
    saved.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_layout_that_needs_more_ranks_is_one_line(tmp_path, capsys):
    """`verse train ... parallel.dp_shard=2` without torchrun: exit 2, one line saying how to launch."""
    code = main(["train", "--preset", "tiny", f"out_dir={tmp_path}/r", "parallel.dp_shard=2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "torchrun --nproc-per-node" in err


GRPO = ("mode=grpo", "max_seq_len=64", "micro_batch_size=4", "grpo.group_size=4", "grpo.prompts_per_step=4",
        "grpo.max_new_tokens=6", "grpo.num_iterations=2", "grpo.beta=0.1", 'grpo.rewards=["dist_worker:fingerprint"]')


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A random tiny byte model (fp32), 8 prompts, the worker's GRPO settings (2 inner updates: old log-probs; beta:
    a reference model), and `reference(*extra)`: one process's 3 steps with `extra` overrides, [loss, reward_mean,
    loss_tokens, completion_len] per step, and its run directory (computed once per `extra`)."""
    from conftest import plus_one_data

    root = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(
        root / "base", tokenizer=verse.load_tokenizer("byte"))
    plus_one_data(root / "data.jsonl", 8)
    overrides = (*GRPO, f"data.sources=[{root / 'data.jsonl'}]")
    done = {}

    def reference(*extra: str) -> tuple:
        if extra not in done:
            out = root / f"one{len(done)}"
            done[extra] = (_grpo_one_process(out, root / "base", 3, *overrides, *extra), out / "run")
        return done[extra]

    return root / "base", overrides, reference


def _grpo_one_process(out: Path, base: Path, steps: int, *overrides: str) -> list:
    """`one_process` with the worker's `fingerprint` reward importable, as torchrun's ranks import it."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        return one_process(out, str(base), steps, *overrides)
    finally:
        sys.path.remove(str(WORKER.parent))
        sys.modules.pop("dist_worker", None)


def _flat(records: list) -> list:
    return [x for r in records for x in r]


def _evals(run: Path) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, extra", [
    ("parallel.dp_shard=2", ""),  # FSDP2
    ("parallel.dp_replicate=2 parallel.dp_shard=1", ""),  # DDP-like (HSDP, shard 1)
    # LoRA adapters sharded with the frozen base (the reference: adapters off); held-out accuracy split over ranks
    ("parallel.dp_shard=2", "finetune.method=lora finetune.lora.rank=4 finetune.lora.alpha=8 "
                            "data.eval_fraction=0.25 grpo.eval_every=3")], ids=["fsdp2", "hsdp", "lora-fsdp2-eval"])
def test_grpo_ranks_match_one_process(tmp_path, grpo_run, layout, extra):
    """mode=grpo on 2 ranks, each sampling the groups of its 2 of the step's 4 prompts: the same completions as one
    process (reward means exactly equal under a reward that fingerprints each completion, same completion tokens)
    and the same losses for 3 steps (fp32, 1e-5): per-prompt generators, loss over the global token count, summed
    gradients, the reference model sharded like the policy."""
    base, overrides, reference = grpo_run
    ref, ref_run = reference(*extra.split())
    torchrun(2, str(WORKER), str(tmp_path), str(base), "3", *overrides, *extra.split(), *layout.split(), timeout=400)
    two = losses(tmp_path, 2)
    assert [r[1:] for r in two] == [r[1:] for r in ref]  # reward_mean, loss_tokens, completion_len: exact
    assert _flat(two) == pytest.approx(_flat(ref), rel=1e-5, abs=1e-5)
    assert ref[0][1] != ref[1][1] != ref[2][1]  # the fingerprint tells the steps' samples apart
    evals = _evals(tmp_path / "run")
    assert evals == _evals(ref_run) and len(evals) == (1 if extra else 0)
    if extra:
        assert evals[0]["eval_problems"] == 2


@pytest.mark.slow
def test_grpo_sharded_checkpoint_resumes(tmp_path, grpo_run):
    """A GRPO run saved by 2 FSDP2 ranks at step 2 (DCP) resumes on 2 ranks and on one process: step 3 samples and
    scores what an uninterrupted run does, with its loss."""
    base, overrides, reference = grpo_run
    ref = reference()[0]
    two = tmp_path / "two"
    torchrun(2, str(WORKER), str(two), str(base), "2", *overrides, "parallel.dp_shard=2")
    assert _flat(losses(two, 2)) == pytest.approx(_flat(ref[:2]), rel=1e-5, abs=1e-5)
    assert (two / "run" / "step-0000002" / "dcp" / ".metadata").is_file()
    one = tmp_path / "one"
    shutil.copytree(two, one, symlinks=True)
    torchrun(2, str(WORKER), str(two), str(base), "3", "resume", *overrides, "parallel.dp_shard=2")
    assert _flat(losses(two, 2, "resume")) == pytest.approx(_flat(ref[2:]), rel=1e-5, abs=1e-5)
    assert _flat(_grpo_one_process(one, base, 3, "resume", *overrides)) == pytest.approx(_flat(ref[2:]), rel=1e-5,
                                                                                          abs=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.prompts_per_step=3"], "grpo.prompts_per_step=3 does not split over 2 data-parallel ranks"),
    (["parallel.tp=2", "parallel.dp_shard=1"], "mode=grpo with parallel.tp=2: rollouts run on data-parallel ranks")])
def test_grpo_layout_it_cannot_split_is_one_line(tmp_path, monkeypatch, capsys, overrides, message):
    """Under torchrun (2 ranks), `verse train mode=grpo` with prompts the ranks do not divide, or tp/ep: exit 2, one
    line, before any process group, model or run directory exists."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--preset", "tiny", "mode=grpo", f"out_dir={tmp_path}/r", *overrides, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_python_dash_m_verse():
    proc = subprocess.run([sys.executable, "-m", "verse", "--version"], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("verse ")


def _run_with_fault(tmp_path, fault: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(tmp_path), "tiny", "6", "save_every=2", *overrides]
    return subprocess.run(cmd, env={**_env(), "VERSE_TEST_FAULT": fault}, capture_output=True, text=True, timeout=240)


def _check_lost_rank(tmp_path, proc, cause: str) -> None:
    """rank 0 ends with one line naming the cause and the intact checkpoint; the checkpoint resumes."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("verse train: error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "rank 0: lost contact with another rank during step 4" in lines[0] and cause in lines[0]
    run = tmp_path / "run"
    assert "step-0000002" in lines[0] and os.readlink(run / "latest") == "step-0000002"
    assert [p.name for p in run.iterdir() if p.name.startswith(("step-", ".tmp"))] == ["step-0000002"]
    assert "Traceback" not in "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank0]"))
    verse.load(run)  # the last good checkpoint is whole


def test_killed_rank_ends_every_rank_with_one_line(tmp_path):
    """Rank 1 is SIGKILLed in step 4: rank 0 stops at once (its collective loses the peer), torchrun ends the job."""
    proc = _run_with_fault(tmp_path, "kill:1:3")
    _check_lost_rank(tmp_path, proc, "Connection")  # closed or reset by peer


@pytest.mark.slow
def test_hung_rank_ends_every_rank_after_the_timeout(tmp_path):
    """Rank 1 hangs in step 4: rank 0's collective times out after parallel.timeout_s, and the job ends."""
    proc = _run_with_fault(tmp_path, "hang:1:3", "parallel.timeout_s=5")
    _check_lost_rank(tmp_path, proc, "Timed out waiting 5000ms")


LORA = ("finetune.method=lora", "finetune.lora.rank=4", "finetune.lora.alpha=8")


def _lora_base(tmp_path: Path, preset: str) -> Path:
    """A random base checkpoint of the worker's shapes (fp32, its 256-token vocabulary); `tiny-nf4`: widths whose
    NF4 blocks FSDP2 can split over 2 ranks (at least two groups of 256 blocks per weight)."""
    over = {"dtype": "float32", "vocab_size": 256}
    if preset == "tiny-nf4":
        preset = "tiny"
        over.update(dim=256, head_dim=64, inter_dim=512)
    elif preset == "bytegpt-tiny":
        over.update(n_layers=2, dim=64, kv_lora_rank=32, inter_dim=128, moe_inter_dim=64)
    torch.manual_seed(3)
    verse.ReasoningLLM(verse.ModelArgs.from_preset(preset, **over)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("preset, layout", [
    pytest.param("tiny", "parallel.dp_shard=2", marks=pytest.mark.slow),  # FSDP2: adapters sharded with the base
    pytest.param("tiny", "parallel.dp_replicate=2", marks=pytest.mark.slow),  # DDP-like (HSDP, shard 1)
    pytest.param("bytegpt-tiny", "parallel.dp_shard=2", marks=pytest.mark.slow)])  # MLA + MoE experts adapted
def test_lora_ranks_match_one_process(tmp_path, preset, layout):
    """LoRA under torchrun: 2 ranks give one process's losses for 5 steps (fp32, 1e-5), rank 0 writes the same PEFT
    adapter one process writes (gathered whole), the base files stay bit-identical, and PEFT on the transformers
    model gives the single-process adapter's logits."""
    from safetensors.torch import load_file

    from test_lora import _hashes

    base = _lora_base(tmp_path, preset)
    before = _hashes(base)
    ref = one_process(tmp_path / "one", str(base), 5, *LORA)
    torchrun(2, str(WORKER), str(tmp_path / "two"), str(base), "5", *LORA, *layout.split(), timeout=400)
    assert losses(tmp_path / "two", 2) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert _hashes(base) == before
    one, two = (tmp_path / name / "run" / "step-0000005" for name in ("one", "two"))
    assert json.loads((two / "adapter_config.json").read_text()) == json.loads((one / "adapter_config.json").read_text())
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # Adam turns float noise in near-zero gradients into lr-sized steps: see test_ranks_match_one_process
        diff = (a[k] - b[k]).abs()
        assert diff.mean() < 1e-4 and diff.max() < 1e-2, (k, diff.mean(), diff.max())
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(two / "dcp")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys  # the base is the run's model
    assert not (two / "model.safetensors").exists()
    if preset == "tiny":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d).eval()(ids).logits
                      for d in (one, two)]
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(verse.load(tmp_path / "two" / "run").eval()(ids), logits[1], rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.slow
def test_lora_sharded_checkpoint_resumes_on_one_process(tmp_path):
    """A LoRA run saved by 2 FSDP2 ranks at step 3 (DCP shards of the adapters and their optimizer state only)
    resumes on one process: steps 4-5 have the losses of an uninterrupted single-process run."""
    base = _lora_base(tmp_path, "tiny")
    ref = one_process(tmp_path / "one", str(base), 5, *LORA)
    two = tmp_path / "two"
    torchrun(2, str(WORKER), str(two), str(base), "3", *LORA, "parallel.dp_shard=2")
    assert losses(two, 2) == pytest.approx(ref[:3], rel=1e-5, abs=1e-5)
    assert one_process(two, str(base), 5, "resume", *LORA) == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_qlora_ranks_match_one_process(tmp_path):
    """QLoRA under torchrun: the NF4 base sharded by FSDP2 as NF4 (torchao's all-gather hooks), 2 ranks give one
    process's losses, the same adapter, the base unchanged; their checkpoint resumes on one process. The first
    step's loss (a forward of the same NF4 values) agrees to 1e-6; QLoRA computes in the base's bf16, so each rank's
    gradient partial sum is rounded to bf16 before the fp32 reduce-scatter adds them (one process rounds the whole
    sum once): later steps agree to 2e-4."""
    from safetensors.torch import load_file

    from test_lora import _hashes

    base = _lora_base(tmp_path, "tiny-nf4")
    before = _hashes(base)
    qlora = ("finetune.method=qlora", *LORA[1:])
    ref = one_process(tmp_path / "one", str(base), 5, *qlora)
    torchrun(2, str(WORKER), str(tmp_path / "two"), str(base), "5", *qlora, "parallel.dp_shard=2", timeout=400)
    got = losses(tmp_path / "two", 2)
    assert got[0] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)
    assert got == pytest.approx(ref, rel=2e-4, abs=2e-4)
    assert _hashes(base) == before
    one, two = (tmp_path / name / "run" / "step-0000005" for name in ("one", "two"))
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # bf16 gradients, Adam-amplified where near zero; a misplaced shard is off by ~0.02 on average
        diff = (a[k] - b[k]).abs()
        assert diff.mean() < 2e-3 and diff.max() < 5e-2, (k, diff.mean(), diff.max())
    # saved by the 2 ranks at step 3 (adapter shards only), resumed on one process: steps 4-5 as straight through
    cut = tmp_path / "cut"
    torchrun(2, str(WORKER), str(cut), str(base), "3", *qlora, "parallel.dp_shard=2")
    assert one_process(cut, str(base), 5, "resume", *qlora) == pytest.approx(ref[3:], rel=2e-4, abs=2e-4)


def test_nf4_base_that_shards_do_not_divide_is_one_line():
    """An NF4 weight with a single group of absmax blocks cannot be split over 2 FSDP2 ranks: one line naming it."""
    from verse.peft import quantize_nf4_
    from verse.peft.qlora import check_nf4_shardable

    model = verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32", vocab_size=256))
    quantize_nf4_(model)
    check_nf4_shardable(model, 1)
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.wq: its NF4 weight \(64, 64\) has 1 scale groups"):
        check_nf4_shardable(model, 2)


@pytest.mark.parametrize("split", ["tp", "ep"])
def test_adapters_under_tensor_or_expert_parallel_are_one_line(split):
    """LoRA is sharded over data-parallel ranks only: a tp or ep layout is refused before any weight is read."""
    from types import SimpleNamespace

    from verse.train.loop import _check_lora_layout

    cfg = TrainConfig.load(None, ["model=tiny", "finetune.method=lora"])
    dist = SimpleNamespace(parallel=ParallelConfig(**{split: 2, "dp_shard": 1}))
    with pytest.raises(ConfigError, match=f"finetune.method=lora with parallel.{split}=2: adapters are sharded over "
                                          "data-parallel ranks only"):
        _check_lora_layout(cfg, dist)
