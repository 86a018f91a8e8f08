"""``benchmarks/bench_matrix.py`` times on the GPU; here (Triton's interpreter, float32, tiny
shapes) its calls of our kernels are checked: each delta member's ``chunk_delta`` call (u_scale,
Longhorn's in-kernel ε through kk_coef) gives what the pair path with the coefficients formed in
torch gives, and the table writer takes rows with and without memory columns."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_matrix as BM  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("method", ["deltanet", "gated_deltanet", "longhorn"])
def test_delta_rows_match_the_pair_path(method):
    km = BM.import_kernels()
    x = BM.make_inputs(1, 37, 2, 16, dtype=torch.float32, device=DEV)
    x["k"] = (x["k"] * 1.7).detach().requires_grad_()        # ‖k‖ ≠ 1: Longhorn's ε depends on it
    outs = []
    for delta in (True, False):
        for t in x.values():
            t.grad = None
        o = BM.ours(method, x, km, delta)
        o.square().sum().backward()
        outs.append([o.detach()] + [x[n].grad.clone() for n in ("q", "k", "v", "beta")])
    for a, b in zip(*outs):
        assert (a - b).abs().max() / max(1.0, b.abs().max()) < 1e-4


def test_markdown_table(tmp_path):
    row = dict(B=1, T=8, H=2, D=4, method="deltanet", ours_fwd=1.0, ours_fwdbwd=2.0, ours_mib=3.5, ref="fla.x",
               ref_fwd="refused", ref_fwdbwd="-", ratio_fwd="-", ratio_fwdbwd="-", floor_fwd=0.1, floor_fwdbwd=0.2)
    md = BM.write_markdown([row, dict(row, method="longhorn", ours_mib="-")], tmp_path, "head")
    assert "| 3.5 |" in md[-2] and md[-1].count("|") == md[-2].count("|") == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU quick_ab times the full shapes")
def test_quick_ab_calls_run(capsys):
    # benchmarks/quick_ab.py on a CPU: every planned call once, tiny, in the interpreter
    import quick_ab

    quick_ab.main()
    assert len(capsys.readouterr().out.strip().splitlines()) == len(quick_ab.PLAN)


def test_quick_ab_plan_and_combined_variants():
    # a plan from the command line; combined variants merge their switches; bad items are refused
    import bench_matrix
    import quick_ab

    plan = quick_ab.parse_plan(["deltanet:recompute+fp32dots:bwd", "linear_attention:split:fwd:1,64,2,16"])
    assert plan == [("deltanet", quick_ab.DN, "recompute+fp32dots", True),
                    ("linear_attention", (1, 64, 2, 16), "split", False)]
    saved = dict(os.environ)
    try:
        assert bench_matrix.set_variant("recompute+fp32dots") is True
        assert os.environ["OLSM_MATRIX_DELTA_SAVE"] == "recompute" and os.environ["OLSM_MATRIX_DOTS"] == "fp32"
        assert os.environ["OLSM_MATRIX_INVERSE"] == "rows4"         # the defaults for the rest
        assert bench_matrix.set_variant("recompute+pair") is False
        bench_matrix.set_variant("chunk128")                        # the script's own switch is reset too
        assert os.environ["OLSM_BENCH_CHUNK"] == "128"
        bench_matrix.set_variant("new")
        assert os.environ["OLSM_BENCH_CHUNK"] == "64"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with pytest.raises(Exception, match="variants are"):
        quick_ab.parse_plan(["deltanet:keep+nope:bwd"])
    with pytest.raises(SystemExit, match="fwd or bwd"):
        quick_ab.parse_plan(["deltanet:recompute:both"])


def test_bench_defaults_are_the_library_defaults():
    # bench_matrix's "new" must time what a user gets: every OLSM_MATRIX_* switch's unset value
    # (the first of env_choice's choices, read from the kernel sources) is ENV_DEFAULTS' value
    import re

    src = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "kernels" / "matrix").glob("*.py"))
    found = dict(re.findall(r'env_choice\("(OLSM_MATRIX_\w+)", \("(\w+)"', src))
    assert found == BM.ENV_DEFAULTS


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it times the full shapes")
def test_host_and_graph_calls_run(capsys):
    # benchmarks/host_and_graph.py on a CPU: each planned call once, tiny, in the interpreter,
    # with its Triton launches counted (and Triton's launchers left as they were)
    import host_and_graph as HG
    from triton.runtime import interpreter, jit

    runs = (jit.JITFunction.run, interpreter.InterpretedFunction.run)
    env = dict(os.environ)
    HG.main(["linear_attention:bwd", "deltanet:fwd:1,64,2,16", "--variants=new,dwboth"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("failed" not in line for line in lines), lines
    assert sum("ours@dwboth" in line for line in lines) == 2, lines
    assert dict(os.environ) == env   # the variants' switches are undone
    assert all(int(line.split("|")[-1].split()[0]) > 0 for line in lines), lines
    assert (jit.JITFunction.run, interpreter.InterpretedFunction.run) == runs
    with pytest.raises(SystemExit):
        HG.parse(["deltanet:both"])
    with pytest.raises(SystemExit):
        HG.parse(["sdpa:fwd"])
