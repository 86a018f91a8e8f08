"""hypothesis strategies: objectives composed at random from olsm's terms.

    from hypothesis import given
    from olsm.testing.strategies import objectives

    @given(objectives())
    def test_derived_is_argmin(obj):
        assert argmin_error(derive(obj)) < 1e-9
"""
from __future__ import annotations

from hypothesis import strategies as st

from ..errors import UnsupportedObjectiveError
from ..objective import Input, Objective, Param
from ..terms import linear_loss, proximal, squared_loss, weight_decay

# one declaration per (name, shape), so equal draws give equal objectives (derive's cache hits)
_LOG_ALPHA = {"none": 0, "head": Input("log_alpha", "head", "nonpositive"),
              "key": Input("log_alpha", "key", "nonpositive"), "param": Param("log_gamma", "head", "nonpositive")}
_BETA = {"head": Input("beta", "head", "positive"), "value": Input("betav", "value", "positive")}
_W = {"head": Input("w", "head", "positive"), "value": Input("wv", "value", "positive")}
_DT = Input("dt", "value", "positive")
_A = Param("A", "value_key", "negative")


@st.composite
def objectives(draw, allow_approximation: bool = True):
    """An affine objective built from proximal / decayed / gated proximal, squared and linear
    losses and weight decay, with an implicit or explicit update.

    Draws that need the diagonal approximation get it (when allowed); others never do, so the
    strategy covers both IR classes.
    """
    anchor = draw(st.sampled_from(["none", "head", "key", "param", "gate"]))
    weight = draw(st.sampled_from([1, 2]))
    log_decay = _DT * _A if anchor == "gate" else _LOG_ALPHA[anchor]
    terms = proximal(log_decay=log_decay, weight=weight)
    losses = draw(st.lists(st.sampled_from(["sq_head", "sq_value", "sq_const", "lin", "lin_head", "lin_value",
                                            "wd"]), min_size=1, max_size=3, unique=True))
    for name in losses:
        terms = terms + {
            "sq_head": lambda: squared_loss(_BETA["head"]),
            "sq_value": lambda: squared_loss(_BETA["value"]),
            "sq_const": lambda: squared_loss(0.5),
            "lin": lambda: linear_loss(),
            "lin_head": lambda: linear_loss(_W["head"]),
            "lin_value": lambda: linear_loss(_W["value"]),
            "wd": lambda: weight_decay(0.25),
        }[name]()
    update = draw(st.sampled_from(["implicit", "explicit"]))
    eta = draw(st.sampled_from([1, 0.5])) if update == "explicit" else 1
    column_dependent = anchor == "gate" or "sq_value" in losses
    has_curvature = any(n.startswith("sq") for n in losses)
    needs_diag = column_dependent and has_curvature
    approximation = "diagonal" if needs_diag or (allow_approximation and draw(st.booleans()) and
                                                 draw(st.booleans())) else None
    if needs_diag and not allow_approximation:
        from hypothesis import assume

        assume(False)
    name = "random_" + "_".join([anchor, update] + sorted(losses) + ([approximation] if approximation else []))
    return Objective(terms, update=update, eta=eta, approximation=approximation, name=name)


__all__ = ["objectives", "UnsupportedObjectiveError"]
