"""Optimizers for training: AdamW (fused kernel where the device has one), 8-bit AdamW (torchao), SGD;
weight-decay groups; fp32 master weights or stochastic rounding for bf16 parameters; and the optimizer step
fused into backward (per-parameter hooks, so no gradient outlives its own update).
"""

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from verse.errors import ConfigError
from verse.optional import import_torchao
from verse.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Split parameters into a decayed group (matrices) and a non-decayed one (norms, embeddings, biases).

    Args:
        model (nn.Module): the model (tied weights appear once).
        weight_decay (float): decay of the first group.

    Returns:
        List[Dict[str, Any]]: torch optimizer parameter groups (empty groups left out).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.startswith("embed") or name.endswith("bias") or "norm" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients as one vector; sharded (DTensor) gradients count whole, whatever their meshes.

    Args:
        grads (List[torch.Tensor]): plain tensors and/or DTensors (FSDP2 shards over the data ranks, 2-D with tp).

    Returns:
        torch.Tensor: a plain scalar, the same on every rank.
    """
    by_mesh: Dict[Any, List[torch.Tensor]] = {}
    for g in grads:  # one norm per mesh: a DTensor reduction cannot mix meshes
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        squares.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float() ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def _torchao_optim():
    try:
        return import_torchao("torchao.optim")
    except ImportError:
        raise ConfigError("optimizer=adamw8bit and bf16_update=stochastic need torchao: "
                          "`pip install torchao`, or use optimizer=adamw with bf16_update=master") from None


def _make(groups: List[Dict[str, Any]], cfg: TrainConfig, stochastic: bool, device: torch.device
          ) -> torch.optim.Optimizer:
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    if cfg.optimizer == "adamw8bit":
        return _torchao_optim().AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                          bf16_stochastic_round=stochastic)
    if stochastic:
        return _torchao_optim()._AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, bf16_stochastic_round=True)
    sharded = [hasattr(p, "device_mesh") for g in groups for p in g["params"]]
    if any(sharded):  # DTensors (FSDP2 / tp): multi-tensor kernels cannot mix them with plain tensors
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=all(sharded))
    fused = device.type in ("cuda", "cpu", "mps", "xpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


class TrainOptimizer:
    """The optimizer side of a run: one object whether steps happen after backward or inside it.

    Args:
        model (nn.Module): parameters to train (their dtype is the storage dtype).
        cfg (TrainConfig): optimizer, lr, betas, eps, weight_decay, bf16_update, fused_backward.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.cfg = cfg
        groups = param_groups(model, cfg.weight_decay)
        self.params: List[nn.Parameter] = [p for g in groups for p in g["params"]]
        low_precision = any(p.dtype != torch.float32 for p in self.params)
        device = self.params[0].device
        self.use_master = low_precision and cfg.bf16_update == "master"
        stochastic = low_precision and cfg.bf16_update == "stochastic"
        # fp32 master copies: the optimizer updates these; the model keeps their bf16 rounding
        self.masters: Optional[List[torch.Tensor]] = None
        if self.use_master:
            self.masters = [p.detach().float().requires_grad_(True) for p in self.params]
            index = {id(p): i for i, p in enumerate(self.params)}
            groups = [{**g, "params": [self.masters[index[id(p)]] for p in g["params"]]} for g in groups]
        targets = [p for g in groups for p in g["params"]]
        self.grad_sq = torch.zeros((), device=device)
        if cfg.fused_backward:
            # one optimizer per parameter, stepped by a hook right after its grad is accumulated
            # (PyTorch tutorial "How to save memory by fusing the optimizer step into the backward pass")
            self.optimizers = [_make([{**g, "params": [t]}], cfg, stochastic, device)
                               for g in groups for t in g["params"]]
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        else:
            self.optimizers = [_make(groups, cfg, stochastic, device)]
        self._targets = targets

    def _hook(self, i: int):
        def step_param(p: torch.Tensor) -> None:
            grad = p.grad
            self.grad_sq += grad.detach().float().pow(2).sum()
            if self.masters is not None:
                self.masters[i].grad = grad.float()
                p.grad = None
            self.optimizers[i].step()
            self.optimizers[i].zero_grad(set_to_none=True)
            if self.masters is not None:
                p.data.copy_(self.masters[i].data)
            p.grad = None

        return step_param

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The one torch optimizer over the model's own parameters (what sharded checkpoints save).

        Raises:
            ConfigError: with fused_backward (one optimizer per parameter) or fp32 master copies.
        """
        if len(self.optimizers) != 1 or self.masters is not None:
            raise ConfigError("sharded checkpoints need one optimizer over the model's parameters: set "
                              "fused_backward=false, and param_dtype=float32 (FSDP2 computes in bf16 with "
                              "precision=bf16) instead of bf16_update=master")
        return self.optimizers[0]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group (torchao keeps it as a tensor)."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr

    def clip_and_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (clipped to `max_norm` when > 0). With fused_backward, the norm seen in backward."""
        if self.cfg.fused_backward:
            norm = self.grad_sq.sqrt()
            self.grad_sq.zero_()
            return norm
        params = [p for p in self.params if p.grad is not None]
        norm = total_norm([p.grad for p in params])
        if max_norm > 0:  # as torch.nn.utils.clip_grads_with_norm_, on each rank's part of sharded gradients
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
            torch._foreach_mul_(local, coef.to(local[0].device))
        return norm

    def step(self, skip: Optional[torch.Tensor] = None) -> None:
        """Apply the accumulated gradients (a no-op with fused_backward: it happened in backward).

        Args:
            skip (Optional[torch.Tensor]): a bool scalar; True leaves weights and optimizer state as they are.
                Fused AdamW reads it inside its kernel (`found_inf`, as `torch.amp.GradScaler` uses it), so the
                host never waits for the device; any other optimizer reads it on the host first.
        """
        if self.cfg.fused_backward:
            return
        opt = self.optimizers[0]
        # what this step will run: a state loaded from another layout (e.g. several ranks' foreach AdamW, resumed on
        # one process) brings its groups' `fused` along
        on_device = (self.masters is None and isinstance(opt, torch.optim.AdamW)
                     and all(g.get("fused") for g in opt.param_groups))
        if skip is not None and not on_device and bool(skip):
            return
        if self.masters is not None:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        if skip is not None and on_device:
            opt.found_inf = skip.to(self.params[0].device, torch.float32)
        try:
            opt.step()
        finally:
            opt.found_inf = None
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)

    def zero_grad(self) -> None:
        """Drop gradients (set to None: frees their memory until the next backward)."""
        for p in self.params:
            p.grad = None
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.grad_sq.zero_()

    def state_dict(self) -> Dict[str, Any]:
        """Optimizer states (and fp32 master weights) as a nested structure of tensors and plain values."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "masters": [m.detach() for m in self.masters] if self.masters is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict` returned (same config and model)."""
        if len(state["optimizers"]) != len(self.optimizers):
            raise ConfigError("optimizer state does not match this configuration (fused_backward changed?)")
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            lr_tensor = [torch.is_tensor(g["lr"]) for g in opt.param_groups]
            opt.load_state_dict(sd)
            for g, was_tensor in zip(opt.param_groups, lr_tensor):
                if was_tensor and not torch.is_tensor(g["lr"]):
                    g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32)
        if self.masters is not None and state.get("masters") is not None:
            with torch.no_grad():
                for m, saved in zip(self.masters, state["masters"]):
                    m.copy_(saved)
