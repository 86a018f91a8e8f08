"""The olsm command line."""
from typer.testing import CliRunner

from olsm.cli import app

runner = CliRunner()


def test_list_shows_the_catalogue():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    for name in ("longhorn", "mamba1", "gated_deltanet"):
        assert name in r.output


def test_derive_prints_recurrence_class_and_proof():
    r = runner.invoke(app, ["derive", "longhorn", "--latex"])
    assert r.exit_code == 0, r.output
    assert "S_t = (I − ε k kᵀ) S_{t-1} + ε k vᵀ" in r.output
    assert "matrix" in r.output and "proved" in r.output and r"\epsilon" in r.output


def test_derive_user_file(tmp_path):
    f = tmp_path / "obj.py"
    f.write_text("from olsm import *\nmine = Objective(proximal() + linear_loss(), name='mine')\n")
    r = runner.invoke(app, ["derive", f"{f}:mine"])
    assert r.exit_code == 0, r.output
    assert "S_t = S_{t-1} + k vᵀ" in r.output


def test_derive_errors_are_clear(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from olsm import *\nb = Input('beta')\nbad = Objective(proximal() + lp_loss(1, b), name='bad')\n")
    r = runner.invoke(app, ["derive", f"{f}:bad"])
    assert r.exit_code == 1 and "not quadratic in S" in r.output
    r = runner.invoke(app, ["derive", "nosuch"])
    assert r.exit_code == 1 and "unknown objective" in r.output


def test_verify_table_and_plot(tmp_path):
    png = tmp_path / "v.png"
    r = runner.invoke(app, ["verify", "deltanet", "mamba1", "--examples", "1", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert r.output.count("pass") == 6 and png.stat().st_size > 1000


def test_verify_checks_option():
    # the opt-in kernel check by name (the interpreter runs it here); an unknown name is an error
    r = runner.invoke(app, ["verify", "mamba1", "--checks", "kernel", "--examples", "1"])
    assert r.exit_code == 0, r.output
    assert "kernel" in r.output and "pass" in r.output and "argmin" not in r.output
    r = runner.invoke(app, ["verify", "mamba1", "--checks", "argmin,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output
