"""`ReasoningLLM`: the decoder-only transformer of Verse (dense Llama/Mistral and DeepSeek MLA/MoE layers)."""

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from verse.config import ModelArgs
from verse.model.attention import Attention
from verse.model.ffn import MLP
from verse.model.linear import Linear, set_gemm_impl
from verse.model.masks import causal_mask
from verse.model.mla import MLA
from verse.model.moe import MoE
from verse.model.norm import RMSNorm
from verse.model.rope import rope_cos_sin, rope_length


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (no float32 copy of a 7B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16."""
    return getattr(torch, name)


class Block(nn.Module):
    """Pre-norm transformer layer: h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h)).

    Args:
        layer_id (int): index of the layer (decides dense or MoE FFN).
        args (ModelArgs): model configuration.
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args) if args.attention == "mla" else Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = (MoE(args) if args.is_moe_layer(layer_id)
                    else MLP(args.dim, args.inter_dim, out_scale=(2 * args.n_layers) ** -0.5))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, aux_loss_scale: float = 1.0) -> torch.Tensor:
        """Apply the layer to `x` [B, T, dim] (arguments as `Attention.forward`; `aux_loss_scale` as `MoE.forward`)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, aux_loss_scale) if isinstance(self.ffn, MoE) else self.ffn(h))


class ReasoningLLM(nn.Module):
    """Decoder-only language model: token embedding, `n_layers` `Block`s, final RMSNorm, output head.

    Args:
        args (ModelArgs): model configuration; parameters are created in `args.dtype`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        device = torch.get_default_device()
        # the layers' own default inits draw from a forked RNG: the caller's seed goes to `init_weights` alone, so
        # a model built on meta and initialised after sharding gets the same weights (verse.train.parallelize)
        with default_dtype(torch_dtype(args.dtype)), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else [], device_type=device.type):
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.head = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.head.weight = self.embed.weight
        set_gemm_impl(self, args.gemm_impl)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @property
    def rope_dim(self) -> int:
        return self.args.rope_dim

    @property
    def moe_layers(self) -> Dict[int, MoE]:
        """The Mixture-of-Experts FFNs by layer index."""
        return {i: layer.ffn for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)}

    def reset_buffers(self) -> None:
        """Empty the RoPE tables (rebuilt at first use, for the length in use) and zero the MoE load counters, on the
        parameters' device (needed after building on `meta`)."""
        device = self.embed.weight.device
        if device.type == "meta":
            return
        self.cos = self.sin = torch.empty(0, self.rope_dim, device=device)
        for moe in self.moe_layers.values():
            moe.reset_stats()

    def rope(self, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The RoPE cos/sin tables [>= length, rope_dim] (float32), grown when `length` exceeds them.

        Tables are built lazily, never for `max_seq_len` up front (1e9 positions would take gigabytes): at first use
        for a power-of-two length that covers `length` (at most `max_seq_len` unless more is needed), so that a few
        growths serve a whole run and compiled code sees a stable size.

        Args:
            length (int): positions needed (0..length-1).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: cos and sin, each float32 [n >= length, rope_dim].
        """
        if self.cos.size(0) < length:
            with torch.inference_mode(False):  # built while generating, they still serve training (backward) later
                self.cos, self.sin = rope_cos_sin(self.args, self.rope_dim, self.embed.weight.device,
                                                  rope_length(length, self.args.max_seq_len))
        return self.cos, self.sin

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style initialization: N(0, std), residual output projections scaled by 1/sqrt(2 * n_layers).

        Each module initialises its own parameters (`init_weights` of `Linear`, `RMSNorm`, `Gate`, `Experts`; the
        owner of a residual output projection sets its `init_scale`), so a model built on `meta`, sharded and
        materialised with `to_empty` is initialised module by module after sharding (torchtitan style).
        """
        self.reset_buffers()
        for name, module in self.named_modules():
            self.init_module(name, module, std)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module, std: float = 0.02) -> None:
        """Initialise one module's own weights as `init_weights` does (a sharded model is initialised module by
        module in the same order, see `verse.train.parallelize.init_sharded`).

        Args:
            name (str): the module's name in `named_modules()`.
            module (nn.Module): the module.
            std (float): standard deviation of the normal init.
        """
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif module is not self and hasattr(module, "init_weights"):
            module.init_weights(std)

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
        """Allocate a static KV cache in every layer for generation.

        Args:
            max_batch_size (int): most sequences generated at once.
            max_seq_len (Optional[int]): most positions (prompt + new tokens); default `args.max_seq_len`.
            dtype (Optional[torch.dtype]): cache dtype; default the model's.
        """
        max_seq_len = min(max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        dtype = dtype or self.embed.weight.dtype
        self.rope(max_seq_len)  # decoding then never grows the tables (compiled steps keep their shapes)
        for layer in self.layers:
            layer.attn.setup_cache(max_batch_size, max_seq_len, dtype)

    def clear_cache(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.attn.cache = None

    @property
    def cache_len(self) -> int:
        """Positions the KV cache holds (0 without a cache)."""
        cache = self.layers[0].attn.cache
        return 0 if cache is None else cache.k.size(2)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, input_pos: Optional[torch.Tensor] = None,
                      aux_loss_scale: float = 1.0) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim] (the output head is left to the caller, e.g. a chunked loss).

        Args:
            input_ids (torch.Tensor): token ids [B, T].
            position_ids (Optional[torch.Tensor]): RoPE positions [B, T]; default 0..T-1, or `input_pos`.
            attn_mask (Optional[torch.Tensor]): bool mask broadcastable to [B, 1, T, S] (True = attend);
                default causal (and sliding-window when configured). With the cache, S is how many cache
                positions are attended (the default: the filled ones, 0..max(input_pos)).
            input_pos (Optional[torch.Tensor]): positions [T] where these tokens go in the KV cache, or [B, T]
                per row (each row its own sequence length); only with `setup_cache` (generation).
            aux_loss_scale (float): weight of the MoE balance loss of this forward in the gradient (training
                with `aux_loss_alpha` > 0; a trainer accumulating N micro-batches passes 1 / N).

        Returns:
            torch.Tensor: [B, T, dim].
        """
        T = input_ids.size(1)
        # positions stay below the sequence length (packed documents restart at 0) or the KV cache's size
        cos, sin = self.rope(max(T, self.cache_len))
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        elif input_pos is not None:
            cos, sin = cos[input_pos], sin[input_pos]
            if input_pos.dim() == 1:
                cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        else:
            cos, sin = cos[:T].unsqueeze(0), sin[:T].unsqueeze(0)
        if input_pos is not None and self.cache_len and attn_mask is None:
            # attend over the filled part of the cache only: keys past the newest position are not written yet
            attn_mask = causal_mask(input_pos, int(input_pos.max()) + 1, self.args.sliding_window)
        elif attn_mask is None and self.args.sliding_window is not None and T > self.args.sliding_window:
            attn_mask = causal_mask(torch.arange(T, device=input_ids.device), T, self.args.sliding_window)
        h = self.embed(input_ids)
        for layer in self.layers:  # activation checkpointing, when wanted, is applied from outside (apply_ac)
            h = layer(h, cos, sin, attn_mask, input_pos, aux_loss_scale)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, input_pos: Optional[torch.Tensor] = None,
                aux_loss_scale: float = 1.0) -> torch.Tensor:
        """Logits for every position.

        Args:
            input_ids (torch.Tensor): token ids [B, T].
            position_ids, attn_mask, input_pos, aux_loss_scale: as in `hidden_states`.

        Returns:
            torch.Tensor: logits [B, T, vocab_size] in the model's dtype.
        """
        return self.head(self.hidden_states(input_ids, position_ids, attn_mask, input_pos, aux_loss_scale))

    def moe_stats(self, reset: bool = True) -> Dict[str, float]:
        """Per-layer expert load since the last reset, flat for metrics: `moe/L/load_min`, `load_max`, `entropy`,
        `dropped`, `overloaded` (see `verse.model.moe.load_stats`); empty for a dense model.

        Args:
            reset (bool): start counting afresh.

        Returns:
            Dict[str, float]: metric name -> value.
        """
        return {f"moe/{i}/{key}": value
                for i, moe in self.moe_layers.items() for key, value in moe.stats(reset).items()}

    def update_router_bias(self, loads: Optional[Dict[int, torch.Tensor]] = None) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: nudge each router's bias against its experts' load error.

        Call after each optimizer step (Verse's trainer does), never between a forward and its backward: activation
        checkpointing must recompute the routing of the forward. A no-op unless `router_bias_update_rate` > 0.

        Args:
            loads (Optional[Dict[int, torch.Tensor]]): tokens per expert by MoE layer index, e.g. summed over
                data-parallel ranks by the trainer; default each layer's own count.
        """
        loads = loads or {}
        for i, moe in self.moe_layers.items():
            moe.update_bias(loads.get(i))

    def num_params(self) -> int:
        """Parameters in the module (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the checkpoint directory of DESIGN.md (loadable by `verse.load` and transformers).

        Args:
            path: target directory (created).
            tokenizer: optional Verse tokenizer saved beside the weights.
            max_shard_bytes (int): shard the safetensors above this size.
        """
        from verse.interop.hf import save_pretrained

        save_pretrained(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
