"""Multi-query associative recall (MQAR), as defined by Zoology (Arora et al., arXiv 2312.04927).

A sequence starts with ``P`` key-value pairs ``k_1 v_1 ... k_P v_P`` (keys from the first half of
the vocabulary, values from the second, keys distinct), followed by a query region where every
key appears once again at a position drawn with a power law that favours short gaps; the model
must output the key's value right after each query. Other query-region positions hold random
tokens and are not scored.

    inputs   k1 v1 k2 v2 k3 v3 | x  k2 x  x  k1 x  k3 ...
    targets  -  -  -  -  -  -  | -  v2 -  -  v1 -  v3 ...       (- = IGNORE, not scored)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..errors import InputError

IGNORE = -100


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting: sequence length and number of key-value pairs."""

    seq_len: int
    num_kv_pairs: int

    def __str__(self):
        return f"{self.seq_len}:{self.num_kv_pairs}"


def parse_mqar_configs(text: str) -> List[MQARConfig]:
    """``"64:4,128:8"`` -> ``[MQARConfig(64, 4), MQARConfig(128, 8)]`` (checked)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            t, p = (int(x) for x in part.split(":"))
        except ValueError:
            raise InputError(f"MQAR settings are SEQ_LEN:PAIRS separated by commas, got {part!r}") from None
        if p < 1 or t < 4 * p:
            raise InputError(f"MQAR {part}: need PAIRS >= 1 and SEQ_LEN >= 4 * PAIRS (pairs, then room "
                             "for one query per key at distinct even offsets)")
        out.append(MQARConfig(t, p))
    if not out:
        raise InputError("no MQAR settings given")
    return out


def mqar_batch(batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int = 8192, power_a: float = 0.01,
               generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw an MQAR batch.

    Args:
        batch_size: ``B``.
        seq_len: ``T`` (>= 4 · num_kv_pairs).
        num_kv_pairs: ``P``.
        vocab_size: keys come from ``[1, V/2)``, values from ``[V/2, V)``.
        power_a: exponent of the query-gap law ``p(g) ∝ g^(a−1)`` (Zoology's default 0.01).
        generator: RNG (the batch is a function of its state).

    Returns:
        ``(inputs [B, T], targets [B, T])`` int64; targets are ``IGNORE`` except after queries.
    """
    B, T, P = batch_size, seq_len, num_kv_pairs
    half = vocab_size // 2
    if P < 1 or T < 4 * P or half - 1 < P:
        raise InputError(f"MQAR needs 1 <= pairs <= vocab/2 - 1 and seq_len >= 4 * pairs; got T={T}, P={P}, "
                         f"vocab={vocab_size}")
    g = generator
    keys = torch.rand(B, half - 1, generator=g).argsort(1)[:, :P] + 1           # distinct per row
    values = torch.randint(half, vocab_size, (B, P), generator=g)
    context = torch.stack([keys, values], 2).reshape(B, 2 * P)
    space = (T - 2 * P) // 2                                                    # query slots
    gaps = torch.arange(1, space + 1, dtype=torch.float64)
    probs = (power_a * gaps ** (power_a - 1)).expand(B, space)
    slot = torch.multinomial(probs, P, replacement=False, generator=g)          # [B, P] distinct slots
    queries = torch.randint(1, vocab_size, (B, T - 2 * P), generator=g)        # random filler
    targets = torch.full((B, T - 2 * P), IGNORE, dtype=torch.long)
    queries.scatter_(1, 2 * slot, keys)
    targets.scatter_(1, 2 * slot, values)  # predicted at the query position (next token = value)
    inputs = torch.cat([context, queries], 1)
    targets = torch.cat([torch.full((B, 2 * P), IGNORE, dtype=torch.long), targets], 1)
    return inputs, targets
