"""One GRPO step for `verse train mode=grpo`: sample groups, score them, and update the policy `num_iterations` times.

The training loop (`verse.train.loop`) keeps its run machinery (checkpoints, resume, signals, metrics, progress) and
calls `GrpoTrainer.step` where SFT calls `train_step`. Everything random in a step (which prompts, which samples)
derives from (seed, step, global prompt index), so a resumed run continues exactly and N data-parallel ranks sample
what one process samples.
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
from verse.train.distributed import Dist, ParallelConfig
from verse.train.metrics import compute_dtype
from verse.train.parallelize import gathered

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

    Under torchrun (`parallel.dp_shard` / `parallel.dp_replicate`, the policy sharded by FSDP2 as for SFT) each
    data-parallel rank takes its own `prompts_per_step / ranks` prompts of the step and samples their groups (a
    group never spans ranks, so advantages stay local), from the policy gathered whole once per rollout
    (`verse.train.parallelize.gathered`); each prompt's group draws from its own generator seeded by the step and
    the prompt's global index, so N ranks sample exactly what one process samples. The loss is divided by the
    completion tokens of the whole step over all ranks (all-reduced before dividing) and FSDP2 sums the gradients,
    so N ranks take one process's step. The reference model (beta > 0, full fine-tune) is built and sharded like
    the policy. Held-out evaluation is split over the ranks and its counts summed.

    Args:
        cfg (TrainConfig): the run's configuration (mode=grpo).
        model (ReasoningLLM): the policy.
        tokenizer: the run's tokenizer (chat template, stop ids, decode).
        problems (Optional[List[Problem]]): training problems; default `load_problems(cfg, tokenizer)`.
        eval_problems (Optional[List[Problem]]): held-out problems; default the data's eval split.
        dist (Optional[Dist]): the job (default one process).
    """

    def __init__(self, cfg, model: nn.Module, tokenizer: Any, problems: Optional[List[Problem]] = None,
                 eval_problems: Optional[List[Problem]] = None, dist: Optional[Dist] = None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.dist = dist or Dist()
        self.args = cfg.grpo_args()
        self.check_layout(cfg, self.dist.parallel)
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
        self.device = model.embed.weight.device
        self.reference: Optional[nn.Module] = None
        if self.args.beta > 0 and cfg.finetune_method == "full":  # LoRA: the base with adapters off, no copy
            if self.dist.enabled:  # the starting checkpoint again, sharded like the policy
                from verse.train.loop import build_model

                self.reference = build_model(cfg, self.device, tokenizer, self.dist)
            else:
                self.reference = copy.deepcopy(model)
            self.reference.eval().requires_grad_(False)

    @staticmethod
    def check_layout(cfg, parallel: ParallelConfig) -> None:
        """Refuse, in one line and before anything is built, a `parallel:` layout GRPO cannot run on.

        Raises:
            ConfigError: tensor or expert parallelism, or `grpo.prompts_per_step` that the data-parallel ranks do
                not divide.
        """
        split = [f"parallel.{k}={getattr(parallel, k)}" for k in ("tp", "ep") if getattr(parallel, k) > 1]
        if split:
            raise ConfigError(f"mode=grpo with {', '.join(split)}: rollouts run on data-parallel ranks only; use "
                              "parallel.dp_shard / parallel.dp_replicate (tp=1, ep=1)")
        ranks = parallel.dp_replicate * parallel.dp_shard
        prompts = cfg.grpo_args().prompts_per_step
        if prompts % ranks:
            raise ConfigError(f"grpo.prompts_per_step={prompts} does not split over {ranks} data-parallel ranks (each "
                              f"samples whole groups of its own prompts): make it a multiple of {ranks}")

    def _seed(self, step: int, index: int) -> int:
        """The sampling seed of global prompt `index` of step `step` (the same on every rank and on resume)."""
        return ((self.cfg.seed * 1_000_003 + step + 1) * 1_000_003 + index) % 2**63

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

    def _same_count(self, batches: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], input_ids: torch.Tensor
                    ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        """`batches` flagged real, padded to the most micro-batches of any rank with stand-ins (one token of a row:
        their loss is multiplied by 0). Under FSDP2 every forward and backward all-gathers and reduces, so every
        rank must run as many; on one process nothing is added."""
        most = max(self.dist.gather_object(len(batches)))
        filler = (input_ids[:1, :2], torch.ones(1, 1, dtype=torch.bool, device=input_ids.device),
                  torch.zeros(1, device=input_ids.device))
        return [(*b, True) for b in batches] + [(*filler, False)] * (most - len(batches))

    def step(self, optimizer, step: int, autocast: contextlib.AbstractContextManager
             ) -> Tuple[Optional[float], int, Optional[torch.Tensor], bool, int, Dict[str, Any]]:
        """Run GRPO step number `step` (0-based): rollouts, rewards, advantages, `num_iterations` updates.

        Returns:
            tuple: (summed loss of the last update or None when non-finite, completion tokens, grad norm,
            whether every update ran, tokens in the batch, the step's GRPO metrics).
        """
        a, cfg, model, dist = self.args, self.cfg, self.model, self.dist
        problems = self._batch(step)
        per = len(problems) // dist.dp_size  # this rank's prompts: a contiguous part of the step's
        first = dist.dp_rank * per
        problems = problems[first:first + per]
        generators = [torch.Generator(self.device).manual_seed(self._seed(step, first + i)) for i in range(per)]
        with gathered(model):  # FSDP2: the full policy, once, for the whole rollout
            policy = model if dist.enabled else generation_copy(model, compute_dtype(cfg.precision, cfg.param_dtype))
            out = rollout(policy, [p.prompt_ids for p in problems], a.group_size, a.max_new_tokens, self.stop_ids,
                          a.temperature, a.top_p, generators)
        texts = [self.tokenizer.decode(c, skip_special=True) for c in out.completions]
        questions = [problems[i].messages[-1]["content"] for i in out.prompt_index]
        scores = score(self.rewards, questions, texts, [problems[i].reference for i in out.prompt_index])
        rewards = torch.tensor(scores.total)
        advantages = group_advantages(rewards, a.group_size, scale=a.scale_rewards).to(self.device)
        mask = out.mask
        if a.overlong_filter:  # DAPO: a completion cut at max_new_tokens is no evidence either way: no loss on it
            mask = mask & ~out.truncated.to(mask.device)[:, None]
        # token-level normalisation over the GLOBAL completion tokens of the step: N ranks == one process
        n_tokens = int(dist.sum(int(mask.sum())))
        batches = micro_batches(out.input_ids, mask, advantages, cfg.micro_batch_size, skip_zero=a.beta == 0)
        rows_trained = sum(len(b[2]) for b in batches)
        batches = self._same_count(batches, out.input_ids)
        old, ref = [None] * len(batches), [None] * len(batches)
        with torch.no_grad():
            for j, (ids, m, _, _) in enumerate(batches):
                if a.num_iterations > 1:  # with one update, old = current (detached): ratio 1, no extra forward
                    old[j] = self._logprobs(model, ids, m, autocast)
                if a.beta > 0:
                    ref_model = self.reference if self.reference is not None else model
                    with adapters_disabled(model) if self.reference is None else contextlib.nullcontext():
                        ref[j] = self._logprobs(ref_model, ids, m, autocast)
        applied_all, loss_sum, grad_norm = bool(batches), None, None
        kl, clipped = 0.0, 0.0
        for _ in range(a.num_iterations):
            local, kl, clipped = 0.0, 0.0, 0.0
            for j, (ids, m, adv, real) in enumerate(batches):
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 reduces the gradients once, after the last
                    model.set_requires_gradient_sync(j == len(batches) - 1)
                logp = self._logprobs(model, ids, m, autocast)
                loss, stats = policy_loss(logp, old[j] if old[j] is not None else logp.detach(), adv,
                                          m if real else torch.zeros_like(m), n_tokens, a.epsilon, a.epsilon_high,
                                          a.beta, ref[j])
                loss.backward()
                local += float(loss.detach()) * n_tokens
                kl, clipped = kl + stats.kl, clipped + stats.clipped
            if not batches:  # every group of every rank scored alike (and no KL term): no signal, no update
                break
            total = dist.sum(local)  # a non-finite loss on any rank skips the update on every rank
            loss_sum = total if math.isfinite(total) else None
            grad_norm = optimizer.clip_and_norm(cfg.grad_clip) if loss_sum is not None else None
            applied = grad_norm is not None and bool(torch.isfinite(grad_norm))
            if applied:
                optimizer.step()
            optimizer.zero_grad()
            applied_all &= applied
        # the step's metrics over every rank's rows (in global prompt order)
        rows = [r for part in dist.gather_object((scores.total, out.lengths.tolist(), out.truncated.tolist()))
                for r in zip(*part)]
        rewards = torch.tensor([r[0] for r in rows])
        lengths = torch.tensor([float(r[1]) for r in rows])
        parts = dist.gather_object(scores.per_function)  # equal rows per rank: the mean of the ranks' means
        kl, clipped = dist.sum(kl), dist.sum(clipped)
        record: Dict[str, Any] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(correction=0)),
            **{f"reward_{name}": sum(p[name] for p in parts) / len(parts) for name in scores.per_function},
            "reward_errors": int(dist.sum(sum(scores.errors.values()))),
            "kl": kl / n_tokens if n_tokens and a.beta > 0 else 0.0,
            "clip_fraction": clipped / n_tokens if n_tokens else 0.0,
            "completion_len": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncated_fraction": sum(r[2] for r in rows) / len(rows), "rows_trained": int(dist.sum(rows_trained))}
        return loss_sum, n_tokens, grad_norm, applied_all, int(dist.sum(out.input_ids.numel())), record

    def evaluate(self, progress: bool = False) -> Dict[str, Any]:
        """Greedy held-out accuracy (`verse.eval.exact_match`; answers compared as numbers where they are); under
        torchrun each data-parallel rank answers its own part of the problems and the counts are summed."""
        from verse.eval.exact_match import exact_match

        dist = self.dist
        mine = self.eval_problems[dist.dp_rank::dist.dp_size]
        training = self.model.training
        self.model.eval()
        try:
            with gathered(self.model):
                result = exact_match(self.model, self.tokenizer, [p.messages for p in mine],
                                     [p.reference for p in mine], pattern=ANSWER_PATTERN,
                                     max_new_tokens=self.args.max_new_tokens, progress=progress and dist.is_main)
        finally:
            self.model.train(training)
        correct = dist.sum(sum(same_answer(s["prediction"], s["reference"]) for s in result.samples))
        total = int(dist.sum(result.total))
        return {"accuracy": correct / total if total else 0.0, "problems": total}
