"""Each catalogue entry derives to exactly its DESIGN §5 update, proven; derivation is fast."""
import time

import pytest
import sympy as sp

import olsm
from olsm import derive
from olsm.derivation import _CACHE
from olsm.symbols import indexed, k_n, kk, v_j

beta, log_alpha = sp.Symbol("beta", positive=True), sp.Symbol("log_alpha", nonpositive=True)
beta_j, dt_j = indexed("beta", ("V",), positive=True), indexed("dt", ("V",), positive=True)
log_alpha_n, A_jn = indexed("log_alpha", ("K",), nonpositive=True), indexed("A", ("V", "K"), False, negative=True)
eps, eps_j = sp.Symbol("eps", positive=True), indexed("eps", ("V",), positive=True)


def eq(a, b):
    return sp.simplify(sp.sympify(a) - sp.sympify(b)) == 0


def lowrank(rec):
    """[(coef·a·b as one expression in k_n, aux substituted)] for comparison."""
    sub = {s: e for s, e in rec.aux}
    return [sp.simplify((lr.coef * lr.a * lr.b).xreplace(sub)) for lr in rec.lowrank]


# name -> (kind, log_decay, [coef·a·b], write value, gate)
EXPECTED = {
    "linear_attention": ("matrix", 0, [], v_j, None),
    "retnet": ("matrix", indexed("log_alpha", (), per_token=False, nonpositive=True), [], v_j, None),
    "mamba2": ("matrix", log_alpha, [], v_j, None),
    "gla": ("matrix", log_alpha_n, [], v_j, None),
    "deltanet": ("matrix", 0, [-beta * k_n**2], beta * v_j, None),
    "gated_deltanet": ("matrix", log_alpha, [-sp.exp(log_alpha) * beta * k_n**2], beta * v_j, None),
    "longhorn": ("matrix", 0, [-beta / (1 + beta * kk) * k_n**2], beta / (1 + beta * kk) * v_j, None),
    "gated_longhorn": ("matrix", log_alpha, [-sp.exp(log_alpha) * beta / (1 + beta * kk) * k_n**2],
                       beta / (1 + beta * kk) * v_j, None),
    "longhorn_diag": ("elementwise", None, None, beta_j / (1 + beta_j * kk) * v_j,
                      1 - beta_j / (1 + beta_j * kk) * k_n**2),
    "mamba1": ("elementwise", None, None, dt_j * v_j, sp.exp(dt_j * A_jn)),
    # (I − β k kᵀ) diag(α): the rank-one term is −β k (α ⊙ k)ᵀ
    "kda": ("matrix", log_alpha_n, [-beta * sp.exp(log_alpha_n) * k_n**2], beta * v_j, None),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_catalogue_derives_to_design_update(name):
    rec = derive(name)
    kind, log_decay, low, write, gate = EXPECTED[name]
    sub = {s: e for s, e in rec.aux}
    assert rec.kind == kind
    assert rec.proof is not None and rec.proof.status.startswith("proved")
    assert eq(rec.write_key, k_n)
    assert eq(rec.write_value.xreplace(sub), write)
    if kind == "matrix":
        assert eq(rec.log_decay, log_decay)
        got = lowrank(rec)
        assert len(got) == len(low) and all(eq(g, w) for g, w in zip(got, low))
    else:
        assert eq(rec.gate.xreplace(sub), gate)


def test_longhorn_epsilon_is_named_and_printed():
    rec = derive("longhorn")
    assert rec.aux and rec.aux[0][0].name == "eps"
    assert eq(rec.aux[0][1], beta / (1 + beta * kk))
    assert eq(rec.write_value, eps * v_j)  # the write coefficient is ε itself
    text = str(rec)
    assert "S_t = (I − ε k kᵀ) S_{t-1} + ε k vᵀ" in text and "ε = β/" in text
    assert r"\epsilon" in rec.latex()
    assert "proved" in rec.describe()
    assert "triton      chunk_delta" in rec.describe()          # the delta form's kernel
    assert "triton      chunk_matrix" in derive("kda").describe()


def test_longhorn_diag_has_per_value_epsilon():
    rec = derive("longhorn_diag")
    assert rec.aux[0][0] == eps_j and rec.approximation == "diagonal"
    assert "diagonal" in rec.proof.status


def test_catalogue_derives_in_under_10s():
    _CACHE.clear()
    start = time.perf_counter()
    for name in olsm.objectives.__all__:
        derive(name)
    assert time.perf_counter() - start < 10


def test_derive_is_cached_and_frozen():
    a = derive("deltanet")
    assert derive("deltanet") is a
    with pytest.raises(Exception):
        a.kind = "elementwise"


def test_inputs_list_names_shapes_constraints():
    rec = derive("mamba1")
    got = {s.name: (s.shape, s.constraint) for s in rec.inputs}
    assert got == {"dt": ("[B, T, H, V]", "positive"), "A": ("[H, V, K]", "negative")}
    assert [s.shape for s in derive("retnet").inputs] == ["[H]"]


def test_user_objective_from_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("from olsm import *\nb = Input('beta')\nmine = Objective(proximal() + squared_loss(b) + "
                 "weight_decay(0.5), name='mine')\n")
    rec = derive(f"{f}:mine")
    # implicit with weight decay μ: (1+μ) I + β k kᵀ, so the decay is 1/(1+μ)
    assert eq(rec.log_decay, -sp.log(sp.Rational(3, 2)))
    assert rec.proof.status == "proved"


def test_explicit_step_with_eta():
    b = olsm.Input("beta", constraint="positive")
    rec = derive(olsm.Objective(olsm.proximal() + olsm.squared_loss(b), update="explicit", eta=0.5, name="half"))
    assert eq(rec.write_value, beta * v_j / 2)
    assert eq(lowrank(rec)[0], -beta * k_n**2 / 2)
