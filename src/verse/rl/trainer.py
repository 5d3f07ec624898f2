"""One GRPO step for `verse train mode=grpo`: sample groups, score them, and update the policy `num_iterations` times.

The training loop (`verse.train.loop`) keeps its run machinery (checkpoints, resume, signals, metrics, progress) and
calls `GrpoTrainer.step` where SFT calls `train_step`. Everything random in a step (which prompts, which samples)
derives from (seed, step), so a resumed run continues exactly.
"""

import contextlib
import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from verse.errors import ConfigError, VerseError
from verse.rl.advantages import group_advantages
from verse.rl.loss import policy_loss, token_logprobs
from verse.rl.rewards import ANSWER_PATTERN, Reward, final_answer, same_answer, score
from verse.rl.rollout import generation_copy, rollout
from verse.train.metrics import compute_dtype

Messages = List[Dict[str, str]]


@dataclass
class Problem:
    """A prompt and what its reward is checked against.

    Attributes:
        messages (Messages): the conversation up to (not including) the last assistant turn.
        prompt_ids (List[int]): `messages` through the chat template, ending with the assistant prompt.
        reference (str): the final answer of the last assistant turn (`Answer: …` / `\\boxed{…}`), else its text.
    """

    messages: Messages
    prompt_ids: List[int]
    reference: str


def load_problems(cfg, tokenizer, split: str = "train") -> List[Problem]:
    """The problems of the `data:` section's sources (`eval_sources` for split="eval"), through the chat template.

    Without `eval_sources`, the last `eval_fraction` of the training problems are the held-out split (the two
    never overlap). Conversations whose prompt leaves no room for `grpo.max_new_tokens` within `max_seq_len` are
    dropped.

    Returns:
        List[Problem]: in source order.
    """
    from verse.data.config import DataConfig
    from verse.eval.extract import normalize
    from verse.eval.records import read_conversations, split_prompt
    from verse.infer.chat import chat_prompt

    data = cfg.data if isinstance(cfg.data, DataConfig) else DataConfig.from_dict(cfg.data or {})
    sources = data.eval_sources if split == "eval" and data.eval_sources else data.sources
    conversations = [c for source in sources for c in read_conversations(source)]
    if not data.eval_sources:
        cut = len(conversations) - int(len(conversations) * data.eval_fraction)
        conversations = conversations[cut:] if split == "eval" else conversations[:cut]
    room = cfg.max_seq_len - cfg.grpo_args().max_new_tokens
    problems = []
    for conversation in conversations:
        messages, answer = split_prompt(conversation)
        ids = chat_prompt(tokenizer, messages)
        if 0 < len(ids) <= room:
            problems.append(Problem(messages, ids, final_answer(answer) or normalize(answer)))
    if split == "train" and not problems:
        raise VerseError(f"mode=grpo: no usable prompts in the data sources ({len(conversations)} conversations; "
                         f"a prompt must fit in max_seq_len={cfg.max_seq_len} minus grpo.max_new_tokens="
                         f"{cfg.grpo_args().max_new_tokens})")
    return problems


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the LoRA/DoRA-adapted modules of `model` as their frozen base layers (the reference policy)."""
    from verse.peft.lora import lora_modules

    modules = list(lora_modules(model).values())
    for m in modules:  # the base class's forward, on the same (frozen) base weights
        m.forward = functools.partial(type(m).__mro__[1].forward, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def micro_batches(input_ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, size: int,
                  skip_zero: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The rows that carry a gradient, in micro-batches of rows of similar length, each cut to its longest row.

    Without a KL term a row whose advantage is 0 adds exactly 0 to the loss and to its gradient (each token's
    term is -min(rho * 0, clip(rho) * 0)), so it need not run at all (DAPO's dynamic sampling drops such groups for
    the same reason); rows without loss tokens (overlong-filtered) neither. Sorting by length and cutting each
    micro-batch at its own longest row skips the right-padding a whole-batch layout would compute.

    Args:
        input_ids (torch.Tensor): [N, T] prompt + completion, right-padded.
        mask (torch.Tensor): [N, T - 1] bool, the loss tokens.
        advantages (torch.Tensor): [N] one per row.
        size (int): most rows per micro-batch.
        skip_zero (bool): drop rows whose advantage is 0 (only exact without a KL term).

    Returns:
        List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: (input_ids, mask, advantages) per micro-batch.
    """
    keep = mask.any(dim=1)
    if skip_zero:
        keep &= advantages != 0
    ends = mask.int().cumsum(dim=1).argmax(dim=1) + 1  # one past the last loss position (the first maximum)
    rows = keep.nonzero().flatten()
    rows = rows[torch.argsort(ends[rows], stable=True)]
    batches = []
    for chunk in rows.split(size) if len(rows) else ():  # (an empty tensor splits into one empty chunk)
        end = int(ends[chunk].max())
        batches.append((input_ids[chunk, :end + 1], mask[chunk, :end], advantages[chunk]))
    return batches


def train_grpo(cfg, **kwargs: Any):
    """`verse.train.loop.train` for a mode=grpo config, with `GrpoTrainer` as its step (what `verse train` calls).

    Args:
        cfg (TrainConfig): a mode=grpo configuration.
        **kwargs: `train`'s other keyword arguments (resume, progress, tokenizer).

    Returns:
        TrainResult: run directory, last checkpoint, per-step metrics.
    """
    from verse.train.loop import train

    return train(cfg, algorithm=GrpoTrainer, **kwargs)


class GrpoTrainer:
    """GRPO on a policy already built for training (full or LoRA), with the run's optimizer.

    Args:
        cfg (TrainConfig): the run's configuration (mode=grpo).
        model (ReasoningLLM): the policy.
        tokenizer: the run's tokenizer (chat template, stop ids, decode).
        problems (Optional[List[Problem]]): training problems; default `load_problems(cfg, tokenizer)`.
        eval_problems (Optional[List[Problem]]): held-out problems; default the data's eval split.
    """

    def __init__(self, cfg, model: nn.Module, tokenizer: Any, problems: Optional[List[Problem]] = None,
                 eval_problems: Optional[List[Problem]] = None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.args = cfg.grpo_args()
        self.rewards = [Reward(r["name"], r["weight"], r["args"]) for r in self.args.rewards]
        for reward in self.rewards:
            reward.function()  # an unknown or unimportable reward stops the run before it starts
        self.problems = problems if problems is not None else load_problems(cfg, tokenizer)
        if eval_problems is None and self.args.eval_every:
            eval_problems = load_problems(cfg, tokenizer, split="eval")
        self.eval_problems = (eval_problems or [])[:self.args.eval_problems]
        if self.args.eval_every and not self.eval_problems:
            raise ConfigError("grpo.eval_every: no held-out problems: set data.eval_sources or data.eval_fraction")
        self.stop_ids = sorted(getattr(tokenizer, "stop_ids", ()) or ())
        if not self.stop_ids:
            raise VerseError("mode=grpo: the tokenizer has no stop ids (eos / end of turn), so completions never end")
        self.reference: Optional[nn.Module] = None
        if self.args.beta > 0 and cfg.finetune_method == "full":  # LoRA: the base with adapters off, no copy
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.device = model.embed.weight.device

    def _batch(self, step: int) -> List[Problem]:
        """The prompts of `step`: epoch after epoch, each epoch in a fresh order seeded by (seed, epoch)."""
        n, P = len(self.problems), self.args.prompts_per_step
        picked = []
        for i in range(step * P, (step + 1) * P):
            epoch, pos = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch))
            picked.append(self.problems[int(order[pos])])
        return picked

    def _logprobs(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, autocast) -> torch.Tensor:
        with autocast:
            return token_logprobs(model, ids, mask, self.args.temperature, self.cfg.loss_chunk_size)

    def step(self, optimizer, step: int, autocast: contextlib.AbstractContextManager
             ) -> Tuple[Optional[float], int, Optional[torch.Tensor], bool, int, Dict[str, Any]]:
        """Run GRPO step number `step` (0-based): rollouts, rewards, advantages, `num_iterations` updates.

        Returns:
            tuple: (summed loss of the last update or None when non-finite, completion tokens, grad norm,
            whether every update ran, tokens in the batch, the step's GRPO metrics).
        """
        a, cfg, model = self.args, self.cfg, self.model
        problems = self._batch(step)
        generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + step + 1)
        policy = generation_copy(model, compute_dtype(cfg.precision, cfg.param_dtype))
        out = rollout(policy, [p.prompt_ids for p in problems], a.group_size, a.max_new_tokens, self.stop_ids,
                      a.temperature, a.top_p, generator)
        texts = [self.tokenizer.decode(c, skip_special=True) for c in out.completions]
        questions = [problems[i].messages[-1]["content"] for i in out.prompt_index]
        scores = score(self.rewards, questions, texts, [problems[i].reference for i in out.prompt_index])
        rewards = torch.tensor(scores.total)
        advantages = group_advantages(rewards, a.group_size, scale=a.scale_rewards).to(self.device)
        mask = out.mask
        if a.overlong_filter:  # DAPO: a completion cut at max_new_tokens is no evidence either way: no loss on it
            mask = mask & ~out.truncated.to(mask.device)[:, None]
        n_tokens = int(mask.sum())
        batches = micro_batches(out.input_ids, mask, advantages, cfg.micro_batch_size, skip_zero=a.beta == 0)
        old, ref = [None] * len(batches), [None] * len(batches)
        with torch.no_grad():
            for j, (ids, m, _) in enumerate(batches):
                if a.num_iterations > 1:  # with one update, old = current (detached): ratio 1, no extra forward
                    old[j] = self._logprobs(model, ids, m, autocast)
                if a.beta > 0:
                    ref_model = self.reference if self.reference is not None else model
                    with adapters_disabled(model) if self.reference is None else contextlib.nullcontext():
                        ref[j] = self._logprobs(ref_model, ids, m, autocast)
        applied_all, loss_sum, grad_norm = bool(batches), None, None
        kl, clipped = 0.0, 0.0
        for _ in range(a.num_iterations):
            loss_sum, kl, clipped = 0.0, 0.0, 0.0
            for j, (ids, m, adv) in enumerate(batches):
                logp = self._logprobs(model, ids, m, autocast)
                loss, stats = policy_loss(logp, old[j] if old[j] is not None else logp.detach(), adv, m, n_tokens,
                                          a.epsilon, a.epsilon_high, a.beta, ref[j])
                loss.backward()
                value = float(loss.detach())
                loss_sum = loss_sum + value * n_tokens if loss_sum is not None and math.isfinite(value) else None
                kl, clipped = kl + stats.kl, clipped + stats.clipped
            if not batches:  # every group scored alike (and no KL term): no signal, no update
                break
            grad_norm = optimizer.clip_and_norm(cfg.grad_clip) if loss_sum is not None else None
            applied = grad_norm is not None and bool(torch.isfinite(grad_norm))
            if applied:
                optimizer.step()
            optimizer.zero_grad()
            applied_all &= applied
        lengths = out.lengths.float()
        record: Dict[str, Any] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(correction=0)),
            **{f"reward_{name}": value for name, value in scores.per_function.items()},
            "reward_errors": sum(scores.errors.values()),
            "kl": kl / n_tokens if n_tokens and a.beta > 0 else 0.0,
            "clip_fraction": clipped / n_tokens if n_tokens else 0.0,
            "completion_len": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncated_fraction": float(out.truncated.float().mean()), "rows_trained": sum(len(b[2]) for b in batches)}
        return loss_sum, n_tokens, grad_norm, applied_all, int(out.input_ids.numel()), record

    def evaluate(self, progress: bool = False) -> Dict[str, Any]:
        """Greedy held-out accuracy (`verse.eval.exact_match`; answers compared as numbers where they are)."""
        from verse.eval.exact_match import exact_match

        training = self.model.training
        self.model.eval()
        try:
            result = exact_match(self.model, self.tokenizer, [p.messages for p in self.eval_problems],
                                 [p.reference for p in self.eval_problems], pattern=ANSWER_PATTERN,
                                 max_new_tokens=self.args.max_new_tokens, progress=progress)
        finally:
            self.model.train(training)
        correct = sum(same_answer(s["prediction"], s["reference"]) for s in result.samples)
        return {"accuracy": correct / len(result.samples) if result.samples else 0.0, "problems": result.total}
