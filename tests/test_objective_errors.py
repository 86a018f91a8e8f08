"""Objectives olsm cannot compile say why, naming the term."""
import pytest

import olsm
from olsm import (Input, NonAffineObjectiveError, Objective, ObjectiveError, ProofError, UnsupportedObjectiveError,
                  derive, huber_loss, linear_loss, lp_loss, proximal, squared_loss)

beta = Input("beta", constraint="positive")


@pytest.mark.parametrize("term, name", [(lp_loss(1, beta), "lp_loss(p=1"), (lp_loss(3, beta), "lp_loss(p=3"),
                                        (huber_loss(1, beta), "huber_loss")])
def test_non_affine_names_the_term(term, name):
    with pytest.raises(NonAffineObjectiveError, match=r"term " + name.replace("(", r"\(") + ".*not quadratic in S"):
        derive(Objective(proximal() + term, name="bad"))


def test_lp_with_p2_is_the_squared_loss():
    a = derive(Objective(proximal() + lp_loss(2, beta), name="lp2"))
    b = derive("longhorn")
    assert str(a) == str(b)


def test_value_beta_without_diagonal_is_unsupported():
    bv = Input("beta", "value", constraint="positive")
    with pytest.raises(UnsupportedObjectiveError, match="approximation='diagonal'"):
        derive(Objective(proximal() + squared_loss(bv), name="col"))


def test_missing_proximal_term():
    with pytest.raises(ObjectiveError, match="no proximal term"):
        derive(Objective(squared_loss(beta) + linear_loss(), name="noprox"))


def test_two_proximal_terms():
    with pytest.raises(ObjectiveError, match="one proximal"):
        derive(Objective(proximal() + proximal(weight=2) + linear_loss(), name="two"))


def test_undeclared_symbol():
    import sympy as sp

    with pytest.raises(ObjectiveError, match="was not declared"):
        derive(Objective(proximal() + squared_loss(sp.Symbol("gamma")), name="undeclared"))


def test_bad_options_and_names():
    with pytest.raises(ObjectiveError):
        Objective(proximal(), update="sideways")
    with pytest.raises(ObjectiveError):
        Objective(proximal(), approximation="lowrank")
    with pytest.raises(ObjectiveError):
        Input("k")
    with pytest.raises(ObjectiveError):
        Input("beta_j")
    with pytest.raises(ObjectiveError, match="unknown objective"):
        derive("longhorne")
    with pytest.raises(ObjectiveError):
        olsm.Input("x", shape="value_key")


def test_proof_rejects_a_wrong_closed_form(monkeypatch):
    """The proof can fail: corrupt the write coefficient and it must object."""
    import olsm.derivation as d

    real = d.classify

    def corrupt(objective, closed):
        fields = real(objective, closed)
        fields["write_value"] = fields["write_value"] * 1.01
        return fields

    monkeypatch.setattr(d, "classify", corrupt)
    with pytest.raises(ProofError, match="not the solution of the normal equations"):
        derive(Objective(proximal() + squared_loss(beta), name="corrupted"))


def test_proof_rejects_a_wrong_diagonal(monkeypatch):
    import sympy as sp

    import olsm.derivation as d
    from olsm.symbols import k_n

    real = d.classify

    def corrupt(objective, closed):
        fields = real(objective, closed)
        fields["gate"] = fields["gate"] + k_n**4 / 7
        return fields

    monkeypatch.setattr(d, "classify", corrupt)
    bv = Input("beta", "value", constraint="positive")
    with pytest.raises(ProofError, match="diagonal"):
        derive(Objective(proximal() + squared_loss(bv), approximation="diagonal", name="corrupted_diag"))
