"""``kernels/matrix/decay_grad.py``: the scalar log-decay's gradient as a suffix sum within each
sequence, in three launches parallel over chunks (Triton's interpreter on CPU), against a plain
per-sequence loop in float64 (and the module's own reference against the same loop): packed sequences of different lengths (an empty one, one longer
than a block of the carry scan), with and without the final-state term and the low-rank b terms."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from olsm.kernels.matrix import decay_grad as DG  # noqa: E402
from olsm.kernels.matrix.chunk import _layout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(dlam, dbb, last, bounds):
    """dg[t] = Σ_{t' ≥ t in t's sequence} Σ_k dlam[k, t'] (+ last at the sequence's end) − Σ_k dbb[k, t]."""
    lam = dlam.double().sum(0)
    dg = torch.zeros_like(lam)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        carry = torch.zeros_like(lam[0]) if last is None else last[i].double()
        for t in range(hi - 1, lo - 1, -1):
            carry = carry + lam[t]
            dg[t] = carry
    if dbb is not None:
        dg = dg - dbb.double().sum(0)
    return dg


@pytest.mark.parametrize("with_last,with_bb", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("bounds,C", [((0, 20, 20, 1300, 1333), 16), ((0, 64 * 70 + 5), 64), ((0, 7), 16)])
def test_decay_gradient_matches_a_per_sequence_loop(bounds, C, with_last, with_bb):
    # 1280 tokens at C = 16 (80 chunks) and 70 chunks at C = 64 cross a block of the carry scan
    assert DG.CARRY_BLOCK < 80
    g = torch.Generator().manual_seed(len(bounds) + C)
    T, H, NK = bounds[-1], 3, 2
    lay = _layout(1, T, C, torch.tensor(bounds, device=DEV) if len(bounds) > 2 else None, torch.device(DEV))
    dlam = torch.randn(NK, T, H, generator=g).to(DEV)
    dbb = torch.randn(NK, T, H, generator=g).to(DEV) if with_bb else None
    last = torch.randn(len(bounds) - 1, H, generator=g).to(DEV) if with_last else None
    # the final-state term ⟨dS_final, S_final⟩ as one-element states: S_final = 1, dS_final = last
    fin = None if last is None else torch.ones(len(bounds) - 1, H, 1, 1, device=DEV)
    d_fin = None if last is None else last[..., None, None]
    args = (dlam, dbb, d_fin, fin, lay.tok_start, lay.tok_stop, lay.chunk_offsets, C)
    dg = DG.decay_gradient(*args)
    ref = reference(dlam.cpu(), None if dbb is None else dbb.cpu(), None if last is None else last.cpu(), bounds)
    assert (dg.cpu().double() - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1.0)
    # the module's plain reference (same signature) agrees with this test's loop over the bounds
    assert (DG.decay_gradient_reference(*args).cpu().double() - ref).abs().max() <= 1e-6 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("with_last", [True, False])
@pytest.mark.parametrize("bounds,C,K", [((0, 20, 20, 1300, 1333), 16, 5), ((0, 64 * 70 + 5), 64, 70)])
def test_per_key_decay_gradient_matches_the_loop(bounds, C, K, with_last):
    # the per-key form (GLA, kernels/matrix/perkey.py): a λ per token and key, the final-state term
    # Σ_v dS ⊙ S per key; K = 70 spans two key blocks of 64, the second masked
    g = torch.Generator().manual_seed(K + C)
    T, H, V = bounds[-1], 2, 3
    lay = _layout(1, T, C, torch.tensor(bounds, device=DEV) if len(bounds) > 2 else None, torch.device(DEV))
    lam = torch.randn(T, H, K, generator=g).to(DEV)
    N = len(bounds) - 1
    fin = torch.randn(N, H, K, V, generator=g).to(DEV) if with_last else None
    d_fin = torch.randn(N, H, K, V, generator=g).to(DEV) if with_last else None
    dg = DG.decay_gradient_per_key(lam, d_fin, fin, lay.tok_start, lay.tok_stop, lay.chunk_offsets, C)
    last = None if fin is None else (fin * d_fin).sum(-1).reshape(N, H * K).cpu()
    ref = reference(lam.reshape(1, T, H * K).cpu(), None, last, bounds).reshape(T, H, K)
    assert (dg.cpu().double() - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1.0)
    # the module's plain reference (same signature) agrees with this test's loop
    mine = DG.decay_gradient_per_key_reference(lam, d_fin, fin, lay.tok_start, lay.tok_stop, lay.chunk_offsets, C)
    assert (mine.cpu().double() - ref).abs().max() <= 1e-6 * ref.abs().max().clamp_min(1.0)
