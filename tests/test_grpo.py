"""GRPO (verse.rl): advantages, the clipped objective, the k3 KL, token-level normalisation and rewards against
hand-computed values; the loss gradient against REINFORCE with a baseline in plain torch."""

import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from verse.rl.advantages import group_advantages
from verse.rl.loss import k3_kl, policy_loss, token_logprobs
from verse.rl.rewards import Reward, exact_answer, format_reward, length_penalty, score


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(0.25 * 0.75)  # population std of {1, 0, 0, 0}
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-6)
    # Dr. GRPO: no division by the std
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_clipped_objective_and_gradient_by_hand():
    # four one-token completions: ratio e^0.5 or e^-0.7 against advantages +1 / -1, clip range [0.8, 1.2]
    old = torch.zeros(4, 1)
    logp = torch.tensor([[0.5], [-0.7], [0.5], [-0.7]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, n_tokens=4, eps_low=0.2, eps_high=0.2)
    up, down = math.exp(0.5), math.exp(-0.7)
    # per token min(ρA, clip(ρ)A): +1.2 (clipped), +e^-0.7, -e^0.5, -0.8 (clipped)
    assert float(loss.detach()) == pytest.approx(-(1.2 + down - up - 0.8) / 4, rel=1e-6)
    loss.backward()
    # d/dlogp of -ρA/4 where unclipped (dρ/dlogp = ρ); 0 where the clipped term is active
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -down / 4, up / 4, 0.0], rel=1e-6)
    assert stats.clipped == 2 and stats.tokens == 4
    # DAPO clip-higher: eps_high = 0.7 lets the first token's ratio e^0.5 = 1.65 through
    loss, _ = policy_loss(logp.detach(), old, adv, mask, n_tokens=4, eps_low=0.2, eps_high=0.7)
    assert float(loss) == pytest.approx(-(up + down - up - 0.8) / 4, rel=1e-6)


def test_k3_kl_by_hand_and_its_expectation_is_the_kl():
    assert float(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == pytest.approx(
        0.5 - math.log(0.5) - 1, rel=1e-6)
    # E_{x~π}[k3(x)] = KL(π || π_ref) exactly for a categorical
    pi, ref = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(pi),
                                                 torch.distributions.Categorical(ref))
    assert float((pi * k3_kl(pi.log(), ref.log())).sum()) == pytest.approx(float(expected), rel=1e-5)
    # in the loss: beta * mean KL over tokens is added
    logp, refp = pi.log()[None], ref.log()[None]
    loss, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 3, dtype=torch.bool), 3, beta=0.1,
                              ref_logp=refp)
    assert float(loss) == pytest.approx(0.1 * float(k3_kl(logp, refp).sum()) / 3, rel=1e-6)
    assert stats.kl == pytest.approx(float(k3_kl(logp, refp).sum()), rel=1e-6)


def test_token_level_normalisation():
    # completion A: 1 token, completion B: 3 tokens (one padding slot in A); ratio 1 everywhere
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, n_tokens=4)
    # token-level: (-1 + 3 * 1) / 4 tokens = 0.5 (a mean of sequence means would give (-1 + 1) / 2 = 0)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, 0, 0, 0.25, 0.25, 0.25])
    # micro-batches passing the step's token count add up to the whole batch
    parts = [policy_loss(logp[i:i + 1].detach(), logp[i:i + 1].detach(), adv[i:i + 1], mask[i:i + 1], 4)[0]
             for i in range(2)]
    assert float(sum(parts)) == pytest.approx(float(loss))


def test_one_iteration_gradient_is_reinforce_with_baseline(tiny_args):
    """μ = 1 (old = current log-probs): the GRPO gradient is -1/N Σ_i A_i Σ_t ∇ log π(y_it), A = (r - mean) / std
    (N = completion tokens of the batch)."""
    from verse.model import ReasoningLLM

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    prompt = [5, 6, 7]
    completions = [[10, 11, 12], [13, 14], [15], [16, 17, 18]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    T = len(prompt) + max(map(len, completions))
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T - 1, dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, :len(prompt) + len(c)] = torch.tensor(prompt + c)
        mask[i, len(prompt) - 1:len(prompt) - 1 + len(c)] = True
    n = int(mask.sum())
    logp = token_logprobs(model, ids, mask)
    adv = group_advantages(rewards, 4)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, n)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # oracle: plain torch, full logits, log_softmax, hand advantages (mean 0.5, std 0.5)
    hand_adv = [(r - 0.5) / (0.5 + 1e-4) for r in rewards.tolist()]
    assert_reinforce_gradient(grads, model, prompt, completions, hand_adv, n)


def test_micro_batches_skip_rows_without_signal_and_padding_but_keep_the_gradient(tiny_args):
    """Rows whose advantage is 0 (a group scored alike) or that have no loss tokens (overlong-filtered) are not run,
    and each micro-batch is cut at its longest row: the gradient is still the hand REINFORCE-with-baseline gradient
    of the whole batch."""
    from verse.model import ReasoningLLM
    from verse.rl.trainer import micro_batches

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    prompt = [5, 6, 7]
    completions = [[10, 11, 12, 13, 14], [13, 14], [15], [16, 17, 18], [20, 21], [22], [23, 24, 25], [26]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # the second group scored alike: advantage 0
    T = len(prompt) + max(map(len, completions))
    ids = torch.zeros(8, T, dtype=torch.long)
    mask = torch.zeros(8, T - 1, dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, :len(prompt) + len(c)] = torch.tensor(prompt + c)
        mask[i, len(prompt) - 1:len(prompt) - 1 + len(c)] = True
    mask[3] = False  # as `grpo.overlong_filter` leaves a truncated completion
    n = int(mask.sum())
    batches = micro_batches(ids, mask, group_advantages(rewards, 4), size=2)
    # rows 2 and 1 (4 and 5 tokens) together, cut at 5 tokens; row 0 (8 tokens) alone; rows 3..7 never run
    assert [tuple(b[0].shape) for b in batches] == [(2, 5), (1, 8)]
    assert [b[0][:, len(prompt)].tolist() for b in batches] == [[15, 13], [10]]
    assert sum(len(b[2]) for b in micro_batches(ids, mask, group_advantages(rewards, 4), 2, skip_zero=False)) == 7
    loss = sum(policy_loss(lp := token_logprobs(model, b_ids, b_mask), lp.detach(), adv, b_mask, n)[0]
               for b_ids, b_mask, adv in batches)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    hand_adv = [(r - 0.5) / (0.5 + 1e-4) for r in (1.0, 0.0, 0.0)]  # rows 0..2; the others add nothing
    assert_reinforce_gradient(grads, model, prompt, completions[:3], hand_adv, n)


def test_token_logprobs_match_full_logits(tiny_args):
    from verse.model import ReasoningLLM

    model = ReasoningLLM(tiny_args)
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    got = token_logprobs(model, ids, mask, temperature=0.7, chunk_size=2)
    full = F.log_softmax(model(ids)[:, :-1].float() / 0.7, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(got, torch.where(mask, full, 0.0), rtol=1e-5, atol=1e-5)


def test_exact_answer_reward():
    assert exact_answer("q", "<think>2+2</think>\nAnswer: 4.0", "4") == 1.0  # numbers compared as numbers
    assert exact_answer("q", "Answer: 3\nno wait, Answer: 1,000", "1000") == 1.0  # the last answer counts
    assert exact_answer("q", "so the result is \\boxed{12}", "12") == 1.0
    assert exact_answer("q", "Answer: 5", "<think>x</think>\nAnswer: 4") == 0.0  # reference's own final answer
    assert exact_answer("q", "no answer here", "4") == 0.0
    assert exact_answer("q", "Answer: Paris", "Paris") == 1.0


def test_format_and_length_rewards():
    assert format_reward("q", "<think>add them</think>\nAnswer: 4", "4") == 1.0
    assert format_reward("q", "add them</think>\nAnswer: 4", "4") == 1.0  # the template opened <think>
    assert format_reward("q", "Answer: 4", "4") == 0.0
    assert format_reward("q", "<think>Answer: 4</think>", "4") == 0.0  # the answer must follow the thinking
    assert length_penalty("q", "x" * 250, "4") == -0.25
    assert length_penalty("q", "x" * 5000, "4") == -1.0


def test_user_reward_and_a_raising_reward_never_crash(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shout(prompt, completion, reference):
            if completion == "boom":
                raise RuntimeError("bad")
            return float(completion.isupper())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rewards = [Reward("my_rewards:shout", 2.0), Reward("exact_answer", 1.0)]
        scores = score(rewards, ["q"] * 3, ["ANSWER: 4", "boom", "Answer: 4"], ["4"] * 3)
        assert scores.total == [2.0, 0.0, 1.0]
        assert scores.errors == {"my_rewards:shout": 1, "exact_answer": 0}
        assert scores.per_function == {"my_rewards:shout": pytest.approx(1 / 3), "exact_answer": pytest.approx(1 / 3)}
    finally:
        sys.modules.pop("my_rewards", None)


def test_unknown_reward_is_one_clear_error():
    from verse.errors import VerseError

    with pytest.raises(VerseError, match="unknown reward 'nope'"):
        Reward("nope").function()
    with pytest.raises(VerseError, match="cannot load reward function 'no_such_mod:f'"):
        Reward("no_such_mod:f").function()


def test_rollout_matches_the_generator_and_masks_only_completions(tiny_args):
    from verse.infer.generate import generate
    from verse.model import ReasoningLLM
    from verse.rl.rollout import rollout

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, None, prompts, max_new_tokens=6, stop_ids=set())
    stop = free[0][2]  # greedy row 0 stops at its third token
    expected = generate(model, None, prompts, max_new_tokens=6, stop_ids={stop})
    out = rollout(model, prompts, group_size=2, max_new_tokens=6, stop_ids=[stop], temperature=0.0)
    assert out.completions == [expected[0], expected[0], expected[1], expected[1]]
    assert out.prompt_index == [0, 0, 1, 1]
    for i, (p, c) in enumerate(zip([prompts[0]] * 2 + [prompts[1]] * 2, out.completions)):
        stopped = len(c) < 6
        n = len(c) + stopped
        assert out.input_ids[i, :len(p) + n].tolist() == p + c + ([stop] if stopped else [])
        assert out.mask[i].nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) - 1 + n))
    assert out.lengths.tolist() == [3, 3] + [len(expected[1]) + (len(expected[1]) < 6)] * 2
    assert out.truncated.tolist() == [len(c) == 6 for c in out.completions]
    # sampling: a seeded generator reproduces the same group
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = rollout(model, prompts, 3, 5, [stop], temperature=1.0, generator=g())
    b = rollout(model, prompts, 3, 5, [stop], temperature=1.0, generator=g())
    assert a.completions == b.completions and torch.equal(a.input_ids, b.input_ids)


def test_each_group_samples_alike_in_any_batch(tiny_args):
    """One generator per prompt: a group's samples depend on its prompt and its own generator only, never on the other
    prompts of the batch (so a rank sampling half of a step's prompts draws what one process draws for them): B's
    group sampled after A's, with generators (1, 2), equals B's group sampled alone from one plain generator 2."""
    from verse.model import ReasoningLLM
    from verse.rl.rollout import rollout

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    a, b = [1, 2, 3, 4, 5], [6, 7]  # different lengths: B is left-padded in the pair, not alone
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    both = rollout(model, [a, b], 4, 6, [0], temperature=1.0, generator=[g(1), g(2)])
    alone = rollout(model, [b], 4, 6, [0], temperature=1.0, generator=g(2))
    assert both.completions[4:] == alone.completions
    assert both.completions[:4] == rollout(model, [a], 4, 6, [0], temperature=1.0, generator=[g(1)]).completions
    assert len({tuple(c) for c in alone.completions}) > 1  # really sampled (not greedy)


def test_training_after_generation_on_the_same_model(tiny_args):
    """GRPO generates (inference mode) and then trains the same model: RoPE tables first built while generating
    must still serve backward (they were inference tensors, and backward raised)."""
    from verse.infer.generate import generate
    from verse.model import ReasoningLLM

    model = ReasoningLLM(tiny_args)
    generate(model, None, [[1, 2, 3]], max_new_tokens=3, stop_ids=set())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(ids).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_grpo_section_is_typed_and_validated():
    from verse.errors import ConfigError
    from verse.train.config import TrainConfig

    cfg = TrainConfig.load(None, ["mode=grpo", "model=x", "grpo.group_size=4", "grpo.epsilon=0.2",
                                  "grpo.epsilon_high=0.28", "grpo.beta=4e-2"])
    args = cfg.grpo_args()
    assert (args.group_size, args.epsilon, args.epsilon_high, args.beta) == (4, 0.2, 0.28, 0.04)
    assert args.num_iterations == 1 and args.rewards == [{"name": "exact_answer", "weight": 1.0, "args": {}}]
    assert args.overlong_filter is False
    assert TrainConfig.load(None, ["mode=grpo", "model=x", "grpo.epsilon=0.3"]).grpo_args().epsilon_high == 0.3
    for override, message in [("grpo.group_size=1", "grpo.group_size: must be at least 2"),
                              ("grpo.beta=-1", "grpo.beta: must be a number >= 0"),
                              ("grpo.temperature=0", "grpo.temperature: must be a positive number"),
                              ("grpo.top_p=1.5", r"grpo.top_p: must be in \(0, 1\]"),
                              ("grpo.nope=1", r"grpo: unknown field\(s\) nope"),
                              ("grpo.rewards=[{name: format, weight: x}]", r"grpo.rewards\[0\].weight: must be a num"),
                              ("grpo.rewards=[]", "grpo.rewards: must be a non-empty list"),
                              ("grpo.rewards=[{weight: 1}]", r"grpo.rewards\[0\]: must be a reward name"),
                              ("grpo.overlong_filter=1", "grpo.overlong_filter: must be true or false"),
                              ("gradient_accumulation_steps=2", "gradient_accumulation_steps: mode=grpo accumulates "
                               "every micro-batch .* set grpo.prompts_per_step for a larger batch")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.load(None, ["mode=grpo", "model=x", override])
    with pytest.raises(ConfigError, match="grpo: set mode=grpo to use it"):
        TrainConfig.load(None, ["mode=sft", "model=x", "grpo.group_size=4"])
    assert TrainConfig.load(None, ["mode=sft", "model=x"]).grpo_args() is None


def test_lora_reference_is_the_base_with_adapters_off(tiny_args):
    from verse.model import ReasoningLLM
    from verse.peft import apply_lora
    from verse.peft.lora import LoraArgs
    from verse.rl.trainer import adapters_disabled

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, LoraArgs(rank=4, alpha=8, dora=True))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.5)
        adapted = model(ids)
        with adapters_disabled(model):
            off = model(ids)
        again = model(ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, adapted)


def test_tiny_model_learns_a_toy_task_by_grpo_alone(tmp_path, monkeypatch):
    """A random tiny byte model, rewarded for characters close to '7', learns to emit them: the reward rises well
    above its start within a few GRPO steps (`verse train mode=grpo` machinery: metrics.jsonl, eval, checkpoint)."""
    import json

    import verse
    from verse.train.config import TrainConfig
    from verse.rl.trainer import train_grpo as train

    (tmp_path / "toy_rewards.py").write_text(
        "def near_seven(prompt, completion, reference):\n"
        "    return sum(max(0.0, 1 - abs(ord(c) - ord('7')) / 64) for c in completion) / max(len(completion), 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(
        tmp_path / "base", tokenizer=verse.load_tokenizer("byte"))
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": "Answer: 7"}]}) + "\n")
    cfg = TrainConfig.from_dict(dict(
        mode="grpo", model=str(tmp_path / "base"), out_dir=str(tmp_path / "run"), max_steps=16, max_seq_len=64,
        data={"sources": [str(tmp_path / "data.jsonl")], "eval_fraction": 0.2}, micro_batch_size=16,
        lr=1e-2, schedule="constant", weight_decay=0.0, precision="fp32", device="cpu", save_every=0, plot=False,
        tensorboard=False,
        grpo={"group_size": 8, "prompts_per_step": 2, "max_new_tokens": 4, "eval_every": 16, "eval_problems": 4,
              "rewards": [{"name": "toy_rewards:near_seven"}, {"name": "exact_answer", "weight": 0.0}]}))
    try:
        result = train(cfg, progress=False)
    finally:
        sys.modules.pop("toy_rewards", None)
    rewards = [m["reward_mean"] for m in result.metrics if m["kind"] == "train"]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert end > start + 0.25 and end > 0.4, rewards
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if r["kind"] == "train"]
    assert len(train_rows) == 16
    for key in ("reward_mean", "reward_std", "reward_toy_rewards:near_seven", "reward_exact_answer", "kl",
                "clip_fraction", "completion_len", "reward_errors"):
        assert key in train_rows[-1], key
    evals = [r for r in logged if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["eval_problems"] == 4 and 0 <= evals[0]["eval_accuracy"] <= 1
    assert result.final_dir is not None and result.final_dir.name.endswith("0000016")


def test_overlong_filter_trains_no_truncated_completion(tmp_path, monkeypatch):
    """`grpo.overlong_filter: true` (DAPO): completions cut at max_new_tokens get no loss; without it they do."""
    import json

    import verse
    from verse.train.config import TrainConfig
    from verse.rl.trainer import train_grpo as train

    torch.manual_seed(0)
    verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(
        tmp_path / "base", tokenizer=verse.load_tokenizer("byte"))
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                 {"role": "assistant", "content": "Answer: 7"}]}) + "\n" for i in range(4)))
    (tmp_path / "toy_rewards2.py").write_text(
        "def mod_seven(prompt, completion, reference):\n    return float(sum(map(ord, completion)) % 7)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {}
    for flag in (False, True):
        cfg = TrainConfig.from_dict(dict(
            mode="grpo", model=str(tmp_path / "base"), out_dir=str(tmp_path / f"run{flag}"), max_steps=1,
            max_seq_len=64, data={"sources": [str(tmp_path / "data.jsonl")]}, micro_batch_size=8, lr=1e-3,
            precision="fp32", device="cpu", save_every=0, plot=False, tensorboard=False,
            grpo={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 3, "overlong_filter": flag,
                  "rewards": ["toy_rewards2:mod_seven"]}))
        try:
            runs[flag] = train(cfg, progress=False).metrics[0]
        finally:
            sys.modules.pop("toy_rewards2", None)
    # the same seeded rollouts in both runs; a random byte model seldom ends within 3 tokens, so most rows are cut
    n_rows, cut = 8, round(runs[True]["truncated_fraction"] * 8)
    assert runs[True]["truncated_fraction"] == runs[False]["truncated_fraction"] and cut >= 4
    assert runs[False]["loss_tokens"] - runs[True]["loss_tokens"] == 3 * cut  # exactly the cut rows' 3 tokens each
    assert runs[False]["rows_trained"] > n_rows - cut >= runs[True]["rows_trained"]


@pytest.mark.slow
def test_grpo_resume_is_exact(tmp_path):
    """2 steps, then `--resume` to 4, equal 4 steps straight: same rewards and losses, bitwise the same weights."""
    import dataclasses
    import json

    from conftest import plus_one_data

    import verse
    from verse.train.config import TrainConfig
    from verse.rl.trainer import train_grpo as train

    torch.manual_seed(0)
    verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(
        tmp_path / "base", tokenizer=verse.load_tokenizer("byte"))
    plus_one_data(tmp_path / "data.jsonl", 5)
    cfg = TrainConfig.from_dict(dict(
        mode="grpo", model=str(tmp_path / "base"), out_dir=str(tmp_path / "straight"), max_steps=4, max_seq_len=64,
        data={"sources": [str(tmp_path / "data.jsonl")]}, micro_batch_size=3, lr=1e-2, schedule="constant",
        precision="fp32", device="cpu", save_every=0, plot=False, tensorboard=False,
        grpo={"group_size": 3, "prompts_per_step": 2, "max_new_tokens": 4, "num_iterations": 2, "beta": 0.1,
              "rewards": ["exact_answer", {"name": "length", "weight": 0.5, "args": {"max_chars": 8}}]}))
    straight = train(cfg, progress=False)
    cut = dataclasses.replace(cfg, out_dir=str(tmp_path / "cut"), max_steps=2)
    first = train(cut, progress=False)
    second = train(dataclasses.replace(cut, max_steps=4), resume=True, progress=False)
    keys = ("loss", "reward_mean", "kl", "clip_fraction")
    assert [[m[k] for k in keys] for m in first.metrics + second.metrics] == [[m[k] for k in keys]
                                                                              for m in straight.metrics]
    assert straight.metrics[-1]["kl"] > 0  # the reference exists and the policy moved away from it
    a = verse.load(straight.final_dir, dtype=torch.float32)
    b = verse.load(second.final_dir, dtype=torch.float32)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_plan_counts_the_reference_and_the_generation_cache(tmp_path, capsys):
    """`verse plan` for mode=grpo: a frozen reference copy when beta > 0 (none with LoRA: the base with adapters off)
    and the rollout's KV cache, by hand for `tiny` (fp32: 2 layers x K and V x 2 kv heads x 16 dims x 4 bytes)."""
    import json

    from verse import ModelArgs
    from verse.cli import main
    from verse.config import count_params
    from verse.train.planner import PlanSettings, plan

    args = ModelArgs.from_preset("tiny")
    settings = PlanSettings(seq_len=256, param_dtype="float32", precision="fp32")  # no autocast weight copies
    sft = plan(args, settings)
    rows = 4 * 8
    cache = rows * 256 * (2 * 2 * 2 * 16 * 4)  # 512 bytes per cached token
    generation = cache + rows * 512 * 4 * 2  # and one step's fp32 logits and probabilities
    grpo = plan(args, settings, rollout_rows=rows, reference=True)
    assert grpo["generation_bytes"] == generation
    assert grpo["reference_bytes"] == count_params(args) * 4
    weights_and_state = sft["weights_bytes"] + sft["optimizer_bytes"]
    assert grpo["peak_bytes"] == max(sft["peak_bytes"], weights_and_state + generation) + count_params(args) * 4
    lora = plan(args, settings, finetune="lora", rollout_rows=rows, reference=True)
    assert lora["reference_bytes"] == 0
    assert plan(args, settings, rollout_rows=rows)["reference_bytes"] == 0  # beta = 0: no reference model
    # an fp32 policy under bf16 autocast samples from a bf16 copy of itself, with a bf16 cache
    mixed = plan(args, PlanSettings(seq_len=256, param_dtype="float32", precision="bf16"), rollout_rows=rows)
    assert mixed["generation_bytes"] == count_params(args) * 2 + cache // 2 + rows * 512 * 4 * 2

    path = tmp_path / "grpo.yaml"
    path.write_text("mode: grpo\nmodel: tiny\nmax_seq_len: 256\nparam_dtype: float32\n"
                    "precision: fp32\ngrpo: {group_size: 8, prompts_per_step: 4, beta: 0.04}\n")
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fitted = args.replace(vocab_size=out["vocab_size"])  # `verse train` sizes a preset's vocabulary to its tokenizer
    assert out["generation_bytes"] == cache + rows * out["vocab_size"] * 4 * 2
    assert out["reference_bytes"] == count_params(fitted) * 4
    assert main(["plan", str(path)]) == 0
    text = capsys.readouterr().out
    assert "reference:" in text and "generation:" in text


def test_plan_per_rank_under_torchrun(tmp_path, capsys):
    """`verse plan mode=grpo --gpus 2`: each data-parallel rank generates its half of the rows from the policy FSDP2
    gathers whole (in its compute dtype), next to its shards; the reference is sharded like the policy. By hand for
    `tiny` as in the single-process plan; tp/ep, or ranks that do not divide the prompts, are refused in one line."""
    import json

    from verse import ModelArgs
    from verse.cli import main
    from verse.config import count_params
    from verse.errors import ConfigError
    from verse.train.distributed import ParallelConfig
    from verse.train.planner import PlanSettings, plan

    args = ModelArgs.from_preset("tiny")
    n = count_params(args)
    two = ParallelConfig(dp_shard=2)
    cache_row, logits_row = 256 * (2 * 2 * 2 * 16 * 4), 512 * 4 * 2  # fp32 cache per row, one step's logits
    fp32 = plan(args, PlanSettings(seq_len=256, param_dtype="float32", precision="fp32"), rollout_rows=32,
                reference=True, parallel=two)
    assert fp32["generation_bytes"] == n * 4 + 16 * (cache_row + logits_row)
    assert fp32["reference_bytes"] == n * 4 / 2
    mixed = plan(args, PlanSettings(seq_len=256, param_dtype="float32", precision="bf16"), rollout_rows=32,
                 parallel=two)  # FSDP2 gathers bf16 copies: a bf16 policy and cache
    assert mixed["generation_bytes"] == n * 2 + 16 * (cache_row // 2 + logits_row)
    with pytest.raises(ConfigError, match="mode=grpo samples whole groups on data-parallel ranks"):
        plan(args, PlanSettings(seq_len=256), rollout_rows=32, parallel=ParallelConfig(dp_shard=1, tp=2))
    path = tmp_path / "grpo.yaml"
    path.write_text("mode: grpo\nmodel: tiny\nmax_seq_len: 256\nparam_dtype: float32\n"
                    "precision: fp32\ngrpo: {group_size: 8, prompts_per_step: 4, beta: 0.04}\n")
    assert main(["plan", str(path), "--gpus", "2", "--parallel", "dp_shard=2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parallel"]["dp_shard"] == 2 and out["reference_bytes"] > 0
    assert main(["plan", str(path), "--gpus", "3", "--parallel", "dp_shard=3"]) == 2  # 4 prompts over 3 ranks
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "mode=grpo samples whole groups" in err


def test_quickstart_rl_card_line_and_config(tmp_path, capsys):
    """`verse quickstart --rl`: DESIGN.md's three-number accuracy line, and its GRPO config is a valid mode=grpo
    config on the same data (checked end to end by test_quickstart_rl_adds_to_sft, slow)."""
    from verse.cli import main
    from verse.quickstart.pipeline import QuickstartConfig, rl_config
    from verse.quickstart.report import card_lines
    from verse.train.config import TrainConfig

    numbers = {"model": "m", "device": "cpu", "config": {"n_eval": 50}, "accuracy_before": 0.12, "accuracy_sft": 0.4,
               "accuracy_after": 0.64, "load_s": 1, "eval_before_s": 2, "train_s": 3, "eval_after_s": 4, "rl_s": 5,
               "eval_after_rl_s": 6, "wall_s": 412}
    lines = card_lines(numbers)
    assert "held-out accuracy: before 12.0% -> after SFT 40.0% -> after RL 64.0%" in lines
    assert "wall time: 412 s" in lines
    cfg = TrainConfig.from_dict(rl_config(QuickstartConfig(rl=True), tmp_path, "sft-model", "tok.gguf",
                                          torch.device("cpu")))
    assert cfg.mode == "grpo" and cfg.model == "sft-model" and cfg.out_dir == str(tmp_path / "rl")
    assert [r["name"] for r in cfg.grpo_args().rewards] == ["exact_answer"]
    assert cfg.data["sources"][0]["path"] == str(tmp_path / "data" / "train.jsonl")
    assert main(["quickstart", "--rl", "--finetune", "lora", "--out", str(tmp_path / "qs")]) == 2
    assert "--rl continues a full fine-tune" in capsys.readouterr().err


def test_quickstart_rl_rewards_only_right_answers_and_its_references_fit(tmp_path):
    """--rl's rewards give a group whose answers are all wrong (a formatted guess, a tally cut at max_new_tokens, no
    format) advantage 0 everywhere; a 0.2 format term, divided by such a group's tiny std, gave the formatted guesses
    the +-2.6 advantages of a right answer. One right answer gets (1 - 1/8) / sqrt(1/8 * 7/8) = sqrt(7). And every
    reference reply (the longest list) fits in max_new_tokens with its stop token, so a cut completion is a runaway."""
    from verse.assets import smollm2_gguf
    from verse.quickstart import task
    from verse.quickstart.pipeline import QuickstartConfig, rl_config
    from verse.tokenization import load_tokenizer
    from verse.train.config import TrainConfig

    qs = QuickstartConfig(rl=True)
    args = TrainConfig.from_dict(rl_config(qs, tmp_path, "sft-model", "tok.gguf", torch.device("cpu"))).grpo_args()
    rewards = [Reward(r["name"], r["weight"], r["args"]) for r in args.rewards]
    tally = "<think>\nfig = kiwi? no, 0\nkiwi = kiwi? yes, 1\n"
    wrong = [tally + "</think>\nAnswer: 1", tally * 9, "Answer: 3", tally + "</think>\nAnswer: 0"] * 2
    total = torch.tensor(score(rewards, ["q"] * 8, wrong, ["2"] * 8).total)
    assert group_advantages(total, 8, scale=args.scale_rewards).tolist() == [0.0] * 8
    right = torch.tensor(score(rewards, ["q"] * 8, [tally + "kiwi = kiwi? yes, 2\n</think>\nAnswer: 2"] + wrong[1:],
                               ["2"] * 8).total)
    advantages = group_advantages(right, 8, scale=args.scale_rewards)
    assert float(advantages[0]) == pytest.approx(math.sqrt(7), rel=1e-3) and bool((advantages[1:] < 0).all())

    tokenizer = load_tokenizer(str(smollm2_gguf()))
    train, heldout = task.make_splits(qs.n_train, qs.n_eval, seed=qs.seed)
    longest = max(len(tokenizer.encode(p.solution())) for p in train + heldout)
    assert longest + 1 <= args.max_new_tokens, (longest, args.max_new_tokens)


@pytest.mark.slow
def test_quickstart_rl_adds_to_sft(tmp_path, capsys):
    """The issue's bar: RL adds at least 10 points of held-out accuracy over its own SFT stage."""
    import json
    import re

    from verse.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--rl", "--out", str(out), "--n-eval", "32"]) == 0
    numbers = json.loads((out / "quickstart.json").read_text())
    assert numbers["accuracy_after"] - numbers["accuracy_sft"] >= 0.10, numbers
    printed = capsys.readouterr().out
    assert re.search(r"^held-out accuracy: before \d+\.\d% -> after SFT \d+\.\d% -> after RL \d+\.\d%$", printed,
                     re.MULTILINE)


def test_cli_grpo_bad_reward_is_one_line_before_anything_is_written(tmp_path, capsys):
    import json

    import verse
    from verse.cli import main

    verse.ReasoningLLM(verse.ModelArgs.from_preset("tiny", dtype="float32")).save_pretrained(
        tmp_path / "base", tokenizer=verse.load_tokenizer("byte"))
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                                                  {"role": "assistant", "content": "Answer: 2"}]}))
    (tmp_path / "grpo.yaml").write_text(f"mode: grpo\nmodel: {tmp_path / 'base'}\nmax_seq_len: 64\ndevice: cpu\n"
                                        f"data: {{sources: [{tmp_path / 'data.jsonl'}]}}\n")
    common = ["train", str(tmp_path / "grpo.yaml"), f"out_dir={tmp_path / 'run'}"]
    for rewards, message in [("[nope]", "unknown reward 'nope'"), ("[no_such_module:f]", "cannot load reward")]:
        assert main(common + [f"grpo.rewards={rewards}"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()
    from verse.errors import ConfigError
    from verse.train.config import TrainConfig
    from verse.train.loop import train

    with pytest.raises(ConfigError, match="mode=grpo runs through verse.rl.trainer.train_grpo"):
        train(TrainConfig.load(common[1], common[2:]))


def test_bench_grpo_without_trl_is_one_clear_line(monkeypatch, capsys):
    from verse.cli import main

    monkeypatch.setitem(sys.modules, "trl", None)  # as if not installed: `import trl` raises ImportError
    assert main(["bench", "grpo", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRL's GRPOTrainer, which is not installed: pip install trl" in err[0]


@pytest.mark.slow
def test_bench_grpo_times_verse_and_trl_on_the_same_settings(capsys):
    """`verse bench grpo --json`: both sides run the same tiny model and settings (both sample the full completion
    length) and report a positive step time; stdout is the one JSON object (TRL's per-step log dicts are not
    printed)."""
    import json

    pytest.importorskip("trl")
    from verse.cli import main

    assert main(["bench", "grpo", "--steps", "1", "--group-size", "2", "--prompts", "1", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    report = json.loads(out[0])
    assert report["verse"]["completion_len"] == report["trl"]["completion_len"] == 4
    assert report["verse"]["s_per_step"] > 0 and report["trl"]["s_per_step"] > 0 and report["speedup"] > 0


def test_generation_copy_is_the_policy_cast_and_leaves_it_alone(tiny_args):
    """An fp32 policy trained under bf16 autocast samples from a bf16 copy: every parameter equals the policy's cast
    (plain `.to`, the oracle), the policy keeps its fp32 weights, and sampling from the copy matches a bf16 model
    built by hand; a policy already in bf16 or in fp32 compute is sampled as it is."""
    import copy as copy_module

    from verse.infer.generate import generate
    from verse.model import ReasoningLLM
    from verse.rl.rollout import generation_copy

    torch.manual_seed(0)
    model = ReasoningLLM(tiny_args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = generation_copy(model, torch.bfloat16)
    oracle = copy_module.deepcopy(model).to(torch.bfloat16)
    oracle.cos, oracle.sin = model.cos, model.sin  # the float32 RoPE tables are not cast
    assert gen is not model
    for (name, p), q in zip(gen.named_parameters(), oracle.parameters()):
        assert p.dtype == torch.bfloat16 and not p.requires_grad and torch.equal(p, q), name
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert generate(gen, None, [[1, 2, 3]], max_new_tokens=5, stop_ids=set()) == \
        generate(oracle, None, [[1, 2, 3]], max_new_tokens=5, stop_ids=set())
    assert generation_copy(model, torch.float32) is model and generation_copy(model, None) is model
    assert generation_copy(oracle, torch.bfloat16) is oracle

def assert_reinforce_gradient(grads, model, prompt, completions, advantages, n):
    """`grads` equal the REINFORCE-with-baseline gradient -sum_i A_i sum_t grad log p(c_i,t) / n, computed in plain
    torch (full logits, log_softmax) one completion at a time."""
    objective = 0.0
    for adv, c in zip(advantages, completions):
        seq = torch.tensor([prompt + c])
        logprobs = F.log_softmax(model(seq)[0, :-1].float(), dim=-1)
        picked = logprobs[torch.arange(len(prompt) - 1, seq.size(1) - 1), torch.tensor(c)]
        objective = objective + adv * picked.sum()
    oracle = torch.autograd.grad(-objective / n, list(model.parameters()))
    for g, o in zip(grads, oracle):
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-6)
