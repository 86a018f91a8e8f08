"""A small causal language model whose token mixers come from an objective.

    ids ─ embed ─ [ x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x)) ] × n_layers ─ RMSNorm ─ embedᵀ ─ logits

Used by ``olsm train mqar`` and ``olsm train lm``; decoding is exact (``step`` gives the
full forward's logits).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import InputError
from .longhorn_block import LonghornBlock
from .mixer import Mixer
from .mlp import SwiGLU
from .norm import RMSNorm
from .padding import check_mask, repad, unpad
from .state import LMCache

BLOCKS = ("mixer", "longhorn")


class Block(nn.Module):
    """Pre-norm residual block: mixer, then (optionally) SwiGLU.

    Args:
        mixer: a :class:`Mixer` or :class:`LonghornBlock`.
        d_model: ``D``.
        mlp_ratio: SwiGLU width ratio (0: no MLP, as in Mamba's and Longhorn's stacks).
    """

    def __init__(self, mixer: nn.Module, d_model: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.mixer = RMSNorm(d_model), mixer
        self.norm2 = RMSNorm(d_model) if mlp_ratio > 0 else None
        self.mlp = SwiGLU(d_model, mlp_ratio) if mlp_ratio > 0 else None

    def forward(self, x, state=None, cu_seqlens=None, use_cache=False):
        out = self.mixer(self.norm1(x), cache=state, cu_seqlens=cu_seqlens, use_cache=use_cache)
        y, state = out if isinstance(out, tuple) else (out, None)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state

    def step(self, x, state):
        y, state = self.mixer.step(self.norm1(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


class MixerLM(nn.Module):
    """Embedding, ``n_layers`` blocks, final RMSNorm, tied output head.

    Args:
        objective: what every mixer's memory solves (name, Objective or Recurrence).
        vocab_size: tokens (256 for bytes, 8192 for MQAR).
        d_model: ``D``.
        n_layers: number of blocks.
        num_heads: heads of :class:`Mixer` (ignored by the Longhorn block, which has one).
        block: ``"mixer"`` (:class:`Mixer`) or ``"longhorn"`` (:class:`LonghornBlock`).
        mlp_ratio: SwiGLU ratio; 0 removes the MLPs.
        tie_embeddings: share the embedding with the output head.
        **mixer_kwargs: passed to every mixer (``backend``, ``qk_norm``, ``d_state``...).
    """

    def __init__(self, objective, vocab_size: int, d_model: int, n_layers: int = 2, num_heads: int = 4, *,
                 block: str = "mixer", mlp_ratio: float = 4.0, tie_embeddings: bool = True, **mixer_kwargs):
        super().__init__()
        if block not in BLOCKS:
            raise InputError(f"block must be one of {BLOCKS}, got {block!r}")
        if vocab_size <= 0 or n_layers <= 0 or d_model <= 0:
            raise InputError(f"vocab_size, n_layers and d_model must be positive, got {vocab_size}, {n_layers}, {d_model}")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.embed = nn.Embedding(vocab_size, d_model)

        def make(i):
            if block == "longhorn":
                return LonghornBlock(objective, d_model, layer_idx=i, **mixer_kwargs)
            return Mixer(objective, d_model, num_heads, layer_idx=i, **mixer_kwargs)

        self.blocks = nn.ModuleList([Block(make(i), d_model, mlp_ratio) for i in range(n_layers)])
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, m):
        # GPT-2 style; coefficient biases and A_log keep their own (Mamba) init
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def objective_name(self) -> str:
        return self.blocks[0].mixer.rec.name

    def forward(self, input_ids: torch.Tensor, cache: Optional[LMCache] = None,
                cu_seqlens: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                use_cache: bool = False):
        """Logits for every position.

        Args:
            input_ids: ``[B, T]`` integer tokens (``[1, total]`` with cu_seqlens).
            cache: state after earlier tokens (see :meth:`generate`).
            cu_seqlens: ``[N + 1]`` boundaries of packed sequences.
            attention_mask: ``[B, T]``, 1 for real tokens (padding anywhere).
            use_cache: also return the :class:`LMCache` after the last real token.

        Returns:
            ``logits [B, T, vocab]`` (zeros at padding) or ``(logits, LMCache)``.
        """
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise InputError(f"input_ids must be an integer tensor [B, T], got "
                             f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
        want = use_cache or cache is not None
        B, T = input_ids.shape
        x = self.embed(input_ids)
        idx = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise InputError("pass either attention_mask or cu_seqlens, not both")
            x, cu_seqlens, idx = unpad(x, check_mask(attention_mask, B, T))
        states: List = list(cache.layers) if cache is not None and cache.layers else [None] * self.n_layers
        for i, blk in enumerate(self.blocks):
            x, states[i] = blk(x, states[i], cu_seqlens, use_cache=want)
        logits = self.head(self.norm(x))
        if idx is not None:
            logits = repad(logits, idx, B, T)
        if not want:
            return logits
        seen = (cache.seen_tokens if cache is not None else 0) + T
        return logits, LMCache(states, seen)

    def step(self, token: torch.Tensor, cache: Optional[LMCache] = None):
        """One decoding step: ``token [B]`` -> ``(logits [B, vocab], LMCache)``."""
        x = self.embed(token)
        states = list(cache.layers) if cache is not None and cache.layers else [None] * self.n_layers
        for i, blk in enumerate(self.blocks):
            x, states[i] = blk.step(x, states[i])
        return self.head(self.norm(x)), LMCache(states, (cache.seen_tokens if cache else 0) + 1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue prompts: prefill with the chunked forward, then decode token by token.

        Args:
            input_ids: prompts ``[B, T]`` (left or right padded when ``attention_mask`` is given).
            max_new_tokens: tokens to add.
            temperature: 0 for greedy decoding.
            top_k: sample among the ``top_k`` likeliest tokens.
            attention_mask: ``[B, T]`` 1 for real prompt tokens.
            generator: RNG for sampling.

        Returns:
            ``[B, max_new_tokens]`` new tokens.
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        logits, cache = self(input_ids, attention_mask=attention_mask, use_cache=True)
        if attention_mask is not None:  # logits after each row's last real token
            last = attention_mask.long().cumsum(1).argmax(1)
            nxt = logits[torch.arange(len(last)), last]
        else:
            nxt = logits[:, -1]
        out = []
        for i in range(max_new_tokens):
            tok = _sample(nxt, temperature, top_k, generator)
            out.append(tok)
            if i + 1 < max_new_tokens:
                nxt, cache = self.step(tok, cache)
        return torch.stack(out, 1) if out else input_ids.new_zeros(input_ids.shape[0], 0)

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count (tied weights once); ``embeddings=False`` leaves the embedding out."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """AdamW groups: no decay for flagged (``_no_weight_decay``), 1-D and embedding parameters."""
        decay, no_decay = [], []
        emb = self.embed.weight
        for p in self.parameters():
            if getattr(p, "_no_weight_decay", False) or p.dim() < 2 or p is emb:
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sample(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
