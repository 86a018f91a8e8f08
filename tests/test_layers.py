"""Layers generated from objectives: decoding == full forward, packing, padding, splits, grads, errors."""
import pytest
import torch

import olsm
from olsm.errors import InputError, ObjectiveError
from olsm.layers import LonghornBlock, Mixer, MixerLM, MixerState
from olsm.load import catalogue

# tiny tensors: one thread avoids OpenMP spin contention between pytest-xdist workers (10-20x)
torch.set_num_threads(1)

NAMES = list(catalogue())
D, H, T = 16, 2, 13
TOL = dict(atol=1e-10, rtol=1e-9)


def make(name, kind="mixer", backend="torch", seed=0):
    torch.manual_seed(seed)
    rec = olsm.derive(name, prove=False)  # the proof has its own tests; keep these fast
    if kind == "mixer":
        m = Mixer(rec, D, H, backend=backend, chunk_size=4)
    else:
        m = LonghornBlock(rec, D, d_state=4, backend=backend, chunk_size=4)
    return m.double()


def x_of(B=2, T=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64)


def decode(m, x, state=None):
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("kind", ["mixer", "longhorn"])
@pytest.mark.parametrize("name", NAMES)
def test_layer_contract(name, kind):
    """Per objective and block, backend torch: decode == forward, splits, packing, padding, grads."""
    m = make(name, kind)
    check_decode(m)
    check_split(m)
    check_packed_and_padded(m)
    check_gradients(m)


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_forward_reference(name):
    check_decode(make(name, "mixer", "reference"))


def check_decode(m):
    x = x_of()
    y, st = m(x, use_cache=True)
    yd, sd = decode(m, x)
    torch.testing.assert_close(yd, y, **TOL)
    torch.testing.assert_close(sd.recurrent, st.recurrent, **TOL)
    for a, b in zip(sd.conv, st.conv):
        torch.testing.assert_close(a, b, **TOL)


def check_split(m):
    """forward(x) == forward(x[:, :t]), then forward(x[:, t:-2], cache), then step() x 2."""
    x = x_of()
    y, st = m(x, use_cache=True)
    y1, s1 = m(x[:, :6], use_cache=True)
    y2, s2 = m(x[:, 6:-2], cache=s1)
    y3, s3 = decode(m, x[:, -2:], s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, **TOL)
    torch.testing.assert_close(s3.recurrent, st.recurrent, **TOL)


def check_packed_and_padded(m):
    xa, xb = x_of(1, 5, seed=2), x_of(1, 8, seed=3)
    ya, sa = m(xa, use_cache=True)
    yb, sb = m(xb, use_cache=True)
    # packed with cu_seqlens
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    y, s = m(torch.cat([xa, xb], 1), cu_seqlens=cu, use_cache=True)
    torch.testing.assert_close(y, torch.cat([ya, yb], 1), **TOL)
    torch.testing.assert_close(s.recurrent, torch.cat([sa.recurrent, sb.recurrent]), **TOL)
    torch.testing.assert_close(s.conv[0], torch.cat([sa.conv[0], sb.conv[0]]), **TOL)
    # padded: a left-padded, b as is; then decoding continues per row
    x = torch.zeros(2, 8, D, dtype=torch.float64)
    x[0, 3:], x[1] = xa[0], xb[0]
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, 3:], mask[1] = 1, 1
    y, s = m(x, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(y[0, 3:], ya[0], **TOL)
    torch.testing.assert_close(y[1], yb[0], **TOL)
    assert y[0, :3].abs().max() == 0
    nxt = x_of(2, 3, seed=4)
    yd, _ = decode(m, nxt, s)
    ya2, _ = m(nxt[:1], cache=sa)
    yb2, _ = m(nxt[1:], cache=sb)
    torch.testing.assert_close(yd, torch.cat([ya2, yb2]), **TOL)
    # right padding and a hole give the same real outputs and states
    x2 = torch.zeros(2, 9, D, dtype=torch.float64)
    x2[0, :2], x2[0, 4:7], x2[1, 1:] = xa[0, :2], xa[0, 2:], xb[0]
    m2 = torch.zeros(2, 9, dtype=torch.long)
    m2[0, :2], m2[0, 4:7], m2[1, 1:] = 1, 1, 1
    y2, s2 = m(x2, attention_mask=m2, use_cache=True)
    torch.testing.assert_close(y2[0, [0, 1, 4, 5, 6]], ya[0], **TOL)
    torch.testing.assert_close(s2.recurrent, s.recurrent, **TOL)


def check_gradients(m):
    m.zero_grad()
    x = x_of().requires_grad_()
    m(x).pow(2).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{m.rec.name}: no gradient reaches {pname}"
    assert x.grad.abs().sum() > 0


def test_parameterisation_follows_constraints():
    m = Mixer("mamba1", D, H)
    assert set(m.coefs.token) == {"dt"} and m.coefs.token["dt"].activation == "dt_softplus"
    assert getattr(m.coefs.fixed["A"].A_log, "_no_weight_decay", False)
    assert m.coefs.fixed["A"]().max() < 0
    m = Mixer("gla", D, H)
    assert m.coefs.token["log_alpha"].activation == "logsigmoid"
    m = Mixer("longhorn", D, H)  # implicit: any β > 0 is stable, so β is unbounded
    assert m.coefs.token["beta"].activation == "softplus" and m.qk_norm
    assert Mixer("deltanet", D, H).coefs.token["beta"].activation == "sigmoid"  # explicit: β‖k‖² ≤ 2
    assert not Mixer("linear_attention", D, H).qk_norm
    r = Mixer("retnet", D, 4)
    gamma = r.coefs.fixed["log_alpha"]().exp()
    torch.testing.assert_close(gamma, 1 - 2.0 ** (-5 - torch.arange(4.0)))
    assert not list(r.coefs.fixed.parameters())  # RetNet's γ is fixed
    b = LonghornBlock("longhorn_diag", 32)
    assert b.d_inner == 64 and b.dt_rank == 2 and b.d_state == 16 and not b.qk_norm
    assert b.token["beta"].activation == "sigmoid" and b.token["beta"].bias.max() < 0  # Mamba Δ-style bias


def test_user_objective_and_overrides():
    beta = olsm.Input("lr", constraint="positive")
    obj = olsm.Objective(olsm.proximal() + olsm.squared_loss(beta), update="implicit", name="my_longhorn")
    m = Mixer(obj, D, H, activation={"lr": "softplus"}, backend="torch")
    assert m.coefs.token["lr"].activation == "softplus"
    assert m(x_of().float()).shape == (2, T, D)
    with pytest.raises(InputError, match="unknown inputs"):
        Mixer(obj, D, H, activation={"beta": "softplus"})


def test_bad_inputs():
    with pytest.raises(ObjectiveError, match="unknown objective"):
        Mixer("no_such_mixer", D, H)
    with pytest.raises(InputError, match="divisible"):
        Mixer("longhorn", 30, 4)
    m = make("longhorn")
    with pytest.raises(InputError, match=r"\[B, T, d_model=16\]"):
        m(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="at least one real token"):
        m(x_of(), attention_mask=torch.zeros(2, T))
    with pytest.raises(InputError, match="attention_mask must be"):
        m(x_of(), attention_mask=torch.ones(2, T + 1))
    with pytest.raises(InputError, match="one token"):
        m.step(x_of())
    with pytest.raises(InputError, match="block must be"):
        MixerLM("longhorn", 10, D, block="transformer")


def test_no_weight_decay_groups():
    lm = MixerLM("mamba2", 32, D, 2, H)
    groups = lm.param_groups(0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    for n, p in lm.named_parameters():
        if n.endswith(("A_log", "bias")) or "norm" in n:
            assert id(p) in no_decay, n
    assert sum(p.numel() for g in groups for p in g["params"]) == lm.num_parameters()


@pytest.mark.parametrize("block", ["mixer", "longhorn"])
def test_lm_decode_and_generate(block):
    torch.manual_seed(0)
    lm = MixerLM("gated_longhorn" if block == "mixer" else "longhorn_diag", 40, D, 2, H, block=block,
                 backend="torch", chunk_size=4, **({"d_state": 4} if block == "longhorn" else {})).double()
    ids = torch.randint(0, 40, (2, 9))
    logits, cache = lm(ids, use_cache=True)
    step_logits, c = [], None
    for t in range(9):
        lt, c = lm.step(ids[:, t], c)
        step_logits.append(lt)
    torch.testing.assert_close(torch.stack(step_logits, 1), logits, **TOL)
    assert cache.seen_tokens == 9 == c.seen_tokens
    # greedy generation == argmax of the full forward, token by token
    new = lm.generate(ids, 4, temperature=0)
    seq = ids
    for i in range(4):
        nxt = lm(seq)[:, -1].argmax(-1)
        assert torch.equal(nxt, new[:, i])
        seq = torch.cat([seq, nxt[:, None]], 1)
    # left-padded prompts generate what the unpadded ones do
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1, :6]], 1)
    padded = torch.cat([padded, ids[1:]], 0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    got = lm.generate(padded, 3, temperature=0, attention_mask=mask)
    assert torch.equal(got[0], lm.generate(ids[:1, :6], 3, temperature=0)[0])
    assert torch.equal(got[1], new[1, :3])
    g = torch.Generator().manual_seed(0)
    assert lm.generate(ids, 3, top_k=5, generator=g).shape == (2, 3)


def test_state_select():
    m = make("longhorn")
    _, s = m(x_of(), use_cache=True)
    s1 = s.select(torch.tensor([1]))
    assert isinstance(s1, MixerState) and s1.recurrent.shape[0] == 1
    torch.testing.assert_close(s1.recurrent, s.recurrent[1:])


def test_torch_compile_cpu():
    """torch.compile traces around the recurrence (a graph break) and gives the eager output."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Mixer("longhorn", D, H, backend="torch")
    x = torch.randn(2, 8, D)
    compiled = torch.compile(m, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x))
    y = compiled(x)
    y.sum().backward()
    assert m.q_proj.weight.grad is not None
