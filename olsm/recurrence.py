"""The callable recurrence users get from :func:`olsm.derive`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends, pretty
from .errors import BackendError
from .ir import RecurrenceIR
from .materialize import delta_coefficients, materialize
from .validate import check_coefficients, check_cu_seqlens, check_qkv, check_state


@dataclass(frozen=True, eq=False)
class Recurrence(RecurrenceIR):
    """A derived, proven recurrence: printable IR plus a call that runs it.

    ``print(rec)`` shows ``S_t = ...``; ``rec.inputs`` lists the coefficient keywords.
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: Optional[float] = None,
        initial_state: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
        backend: str = "auto",
        chunk_size: int = 64,
        check_inputs: bool = True,
        **coefs: torch.Tensor,
    ):
        """Run the recurrence over a sequence.

        Args:
            q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
            scale: readout scale (default ``K ** -0.5``).
            initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with cu_seqlens) or None.
            output_final_state: also return the final state.
            cu_seqlens: ``[N + 1]`` packed-sequence boundaries (then B == 1).
            backend: ``auto`` (triton on CUDA, torch elsewhere), ``torch``, ``triton``,
                ``reference`` or ``recurrent``.
            chunk_size: chunk length of chunked backends.
            check_inputs: check values (NaN, constraints); shapes are always checked.
            **coefs: the coefficients ``rec.inputs`` lists (``beta=...``).

        Returns:
            ``(o [B, T, H, V], S [B, H, K, V] or None)``.
        """
        dims = check_qkv(q, k, v)
        check_coefficients(self, coefs, dims, q.device, check_inputs)
        if cu_seqlens is not None:
            n = check_cu_seqlens(cu_seqlens, dims, q.device)
            check_state(initial_state, n, dims, q.device, what="N")
        else:
            check_state(initial_state, dims[0], dims, q.device)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        scale = dims[3] ** -0.5 if scale is None else scale
        name = backends.resolve(backend, q.device)
        opts = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens, chunk_size=chunk_size)
        if name == "triton":
            return self._triton(q, k, v, coefs, opts)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        fn = backends.numeric(name, self.kind)
        return fn(q, **materialize(self, k, v, coefs, acc), **opts)

    def _triton(self, q, k, v, coefs, opts):
        try:
            if self.kind == "matrix":
                from olsm.kernels.matrix import chunk_delta, chunk_matrix
            else:
                from olsm.kernels.elementwise import elementwise_scan
        except ImportError as e:
            raise BackendError(f"the triton backend for the {self.kind} class is not available here "
                               f"({e}); use backend='torch'") from e
        if self.kind == "matrix":
            # coefficients are computed in float32, then the kernel's operands take q's dtype
            # (bf16 tensor cores); the log-decay stays float32 (cumulative sums need it)
            t = materialize(self, k, v, coefs, torch.float32, delta=True)
            t["w"], t["u"] = t["w"].to(q.dtype), t["u"].to(q.dtype)
            if "c" in t:
                # the delta form: one effective value per token (c and u_scale stay float32)
                return chunk_delta(q, t["w"], t["u"], t["c"], t["log_decay"], u_scale=t.get("u_scale"),
                                   kk_coef=t.get("kk_coef"), **opts)
            t["lowrank"] = tuple((a.to(q.dtype), b.to(q.dtype)) for a, b in t["lowrank"])
            return chunk_matrix(q, **t, **opts)
        return elementwise_scan(self, q, k, v, coefs, **opts)

    def step(self, q, k, v, state=None, *, scale=None, **coefs):
        """Decode one token from a state.

        Args:
            q, k: ``[B, H, K]``; v: ``[B, H, V]``; per-token coefficients without the T axis
                (``beta [B, H]``), fixed ones as usual.
            state: ``[B, H, K, V]`` or None (zeros).

        Returns:
            ``(o [B, H, V], new state [B, H, K, V])``.
        """
        per_token = {s.name for s in self.inputs if s.per_token}
        coefs = {n: (x.unsqueeze(1) if n in per_token and torch.is_tensor(x) else x) for n, x in coefs.items()}
        o, S = self(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale, initial_state=state,
                    output_final_state=True, backend="recurrent", **coefs)
        return o[:, 0], S

    # ------------------------------------------------------------------ printing
    def __str__(self) -> str:
        return pretty.update_text(self)

    def __repr__(self) -> str:
        return f"Recurrence({self.name!r}, kind={self.kind!r}, inputs={[s.name for s in self.inputs]})"

    def latex(self) -> str:
        """The update in LaTeX."""
        return pretty.update_latex(self)

    def describe(self) -> str:
        """Objective, recurrence, IR class, inputs and proof, as ``olsm derive`` prints them."""
        o = self.objective
        lines = [f"objective   {o.formula()}", "recurrence  " + str(self).replace("\n", "\n            ")]
        cls = self.kind
        if self.kind == "matrix":
            decay = "none" if self.log_decay == 0 else ("per key" if any(
                s.name.endswith("_n") for s in self.log_decay.free_symbols) else "scalar per head")
            low = "none" if not self.lowrank else ("delta (k kᵀ)" if all(lr.is_delta for lr in self.lowrank)
                                                   else "general a bᵀ") + f", rank {len(self.lowrank)}"
            cls += f" (decay: {decay}; low rank: {low})"
            kernel = ("chunk_delta (one effective value per token)" if self.is_delta_form and decay != "per key"
                      else "chunk_matrix")
            b = delta_coefficients(self)[2] if kernel.startswith("chunk_delta") else None
            if b is not None:
                kernel += f"; 1/(1 + {b}·kᵀk) formed in the kernel"
        else:
            cls += " (gate G[n, j] computed from per-key and per-value factors)"
            kernel = "generated elementwise scan"
        lines.append(f"IR class    {cls}")
        lines.append(f"triton      {kernel}")
        ins = ", ".join(f"{s.name} {s.shape}" + (f" {s.constraint}" if s.constraint else "") for s in self.inputs)
        lines.append(f"inputs      {ins or '(none)'}")
        if self.proof is not None:
            lines.append(f"proof       {self.proof.status} in {self.proof.seconds:.2f} s")
            lines += [f"            - {c}" for c in self.proof.checks]
        return "\n".join(lines)
