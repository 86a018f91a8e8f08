"""Does a model train the same on the Triton kernels as on the torch backend? (GPU check)

Kernel tests compare one recurrence call; this compares what training sees: for each objective, one
MixerLM on MQAR batches, built once and copied, run with ``backend="torch"`` and ``backend="auto"``
(Triton, forced: no fallback). It prints the relative gap of the loss and of every parameter's gradient at init, and
then trains both copies for ``--steps`` AdamW steps from the same init on the same batches and
prints both loss curves, so a kernel bug shows as a gap far above float32 rounding early on
(late in training, chaotic dynamics amplify rounding, so only the early gap is a test).

    python scripts/backend_agreement.py --out results.md

(on CUDA; on the CPU it runs in the Triton interpreter: ``TRITON_INTERPRET=1 ... --device cpu``, slow)
"""
from __future__ import annotations

import argparse
import copy

import torch

from olsm.layers import MixerLM
from olsm.train.loop import batch_generator, lm_loss
from olsm.train.mqar import mqar_batch

OBJECTIVES = ["longhorn", "longhorn_diag", "gated_longhorn", "deltanet", "gated_deltanet", "mamba2", "mamba1",
              "gla", "linear_attention"]


def set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(m.backend, str):
            m.backend = backend
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="*", default=OBJECTIVES)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--num-heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    marks = sorted({min(10, args.steps), min(50, args.steps), args.steps})
    lines = [f"device {where}, torch {torch.__version__}; MixerLM 2 layers, d_model "
             f"{args.d_model}, {args.num_heads} heads, MQAR {args.seq_len}:{args.pairs}, batch {args.batch_size}, fp32",
             "", "| objective | loss gap at init | max grad gap at init | "
             + " | ".join(f"loss step {s} torch / triton" for s in marks) + " |", "|---" * (3 + len(marks)) + "|"]
    print("\n".join(lines), flush=True)
    for name in args.objectives:
        torch.manual_seed(0)
        ref = MixerLM(name, 8192, args.d_model, 2, args.num_heads, backend="torch").to(dev)
        tri = set_backend(copy.deepcopy(ref), "triton")
        x, y = (t.to(dev) for t in mqar_batch(args.batch_size, args.seq_len, args.pairs,
                                               generator=batch_generator(0, 0)))
        losses = []
        for m in (ref, tri):
            loss = lm_loss(m(x), y)
            loss.backward()
            losses.append(loss.detach())
        ggap = max(rel(pt.grad, pr.grad) for pt, pr in zip(tri.parameters(), ref.parameters())
                   if pr.grad is not None)
        curves = {}
        for tag, m in (("torch", ref), ("triton", tri)):
            opt = torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
            curve = []
            for step in range(args.steps):
                xb, yb = (t.to(dev) for t in mqar_batch(args.batch_size, args.seq_len, args.pairs,
                                                         generator=batch_generator(0, step)))
                opt.zero_grad(set_to_none=True)
                loss = lm_loss(m(xb), yb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                curve.append(loss.item())
            curves[tag] = curve
        at = lambda s: f"{curves['torch'][s - 1]:.4f} / {curves['triton'][s - 1]:.4f}"
        line = f"| {name} | {rel(losses[1], losses[0]):.1e} | {ggap:.1e} | " + " | ".join(at(s) for s in marks) + " |"
        print(line, flush=True)
        lines.append(line)
    if args.out:
        open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
