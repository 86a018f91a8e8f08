"""Launch shapes of the elementwise-gate kernels (``olsm.kernels.elementwise.config``).

The GPU defaults were chosen by measurement (benchmarks/README.md, H200 sweeps); these tests pin
them, so a change to the heuristic is a visible decision, and check the override rules.
"""
import pytest
import torch

from olsm.errors import BackendError, InputError
from olsm.kernels.elementwise.config import (
    CARRY_BT,
    DEFAULT_SLAB,
    FEW_PROGRAMS_PER_SM,
    GRADS_C,
    MAX_BT,
    MAX_REG_SLOTS,
    MIN_BT,
    REG_SLOTS,
    TILE_ELEMS,
    Tile,
    auto_backward_split,
    carry_block,
    choose_config,
)
from olsm.kernels.elementwise.scan import backward_segments, default_backward_split

CUDA = torch.device("cuda")  # constructing the device needs no GPU


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    # the GPU heuristic, not the interpreter's small tiles; the library's default slab
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("OLSM_ELEMENTWISE_SLAB", raising=False)
    monkeypatch.delenv("OLSM_ELEMENTWISE_BWD_SPLIT", raising=False)
    monkeypatch.delenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", raising=False)
    monkeypatch.delenv("OLSM_ELEMENTWISE_CARRY_BT", raising=False)


def test_measured_defaults_at_the_paper_shape():
    cfg = choose_config(2048, 16, 1536, 64, CUDA)
    assert (cfg.BK, cfg.C, cfg.slab) == (16, 128, "registers")      # 16 register slots of 8 tokens
    assert cfg.fwd == Tile(BT=16, BV=8, num_warps=1)
    assert cfg.bwd == Tile(BT=8, BV=4, num_warps=1)
    assert cfg.bwd.launch_options() == {"num_warps": 1}


def test_few_programs_double_the_forward_block_on_one_warp():
    # B = 2 at d_model 768 (E = 1536): 384 forward programs on an H200's 132 SMs, 2.9 per SM
    few = choose_config(8192, 16, 1536, 64, CUDA, sequences_heads=2, sms=132)
    assert few.fwd == Tile(BT=32, BV=8, num_warps=1)
    assert few.bwd == Tile(BT=8, BV=4, num_warps=1) and few.C == 128  # the backward keeps its tile
    # B = 8: 1536 programs, 11.6 per SM: the measured default
    assert choose_config(2048, 16, 1536, 64, CUDA, sequences_heads=8, sms=132).fwd == Tile(BT=16, BV=8, num_warps=1)
    # the threshold is programs per SM, at the boundary and either side of it
    sms = 96                                            # 4 sequences × heads give exactly 8 per SM
    at = FEW_PROGRAMS_PER_SM * sms // (1536 // 8)
    assert at * (1536 // 8) == FEW_PROGRAMS_PER_SM * sms
    assert choose_config(2048, 16, 1536, 64, CUDA, sequences_heads=at, sms=sms).fwd.BT == 16
    assert choose_config(2048, 16, 1536, 64, CUDA, sequences_heads=at - 1, sms=sms).fwd.BT == 32
    # an explicit block wins; a short sequence caps the block; warps follow an override
    assert choose_config(8192, 16, 1536, 64, CUDA, block_t=16, sequences_heads=2, sms=132).fwd.BT == 16
    assert choose_config(16, 16, 1536, 64, CUDA, sequences_heads=2, sms=132).fwd.BT == 16
    assert choose_config(8192, 16, 1536, 64, CUDA, num_warps=(2, None), sequences_heads=2, sms=132).fwd.num_warps == 2


@pytest.mark.parametrize("K,V,T", [(16, 1536, 2048), (64, 128, 1000), (256, 256, 3), (5, 3, 1), (100, 7, 77)])
def test_tiles_are_powers_of_two_within_bounds(K, V, T):
    cfg = choose_config(T, K, V, 64, CUDA)
    for t in (cfg.fwd, cfg.bwd):
        for x in (t.BT, t.BV, t.num_warps):
            assert x >= 1 and x & (x - 1) == 0
        assert t.BT <= max(MAX_BT, 1) and (t.BT >= MIN_BT or t.BT >= T)
        assert t.BV <= max(8, V)
    # the register slab's interval is capped at what the sequence needs
    assert cfg.BK >= K and cfg.C % max(cfg.fwd.BT, cfg.bwd.BT) == 0 and (cfg.C >= 64 or cfg.C >= T)
    # register tiles stay near their budget (a wide key can force the 4-token minimum block)
    for t, elems in ((cfg.fwd, TILE_ELEMS[0]), (cfg.bwd, TILE_ELEMS[1])):
        assert t.BT * cfg.BK * t.BV <= 2 * elems


def test_overrides_per_kernel_and_register_cap():
    cfg = choose_config(2048, 16, 1536, 100, CUDA, block_t=(32, None), block_v=4, num_warps=(None, 2),
                        max_registers=(None, 168))
    assert (cfg.fwd.BT, cfg.fwd.BV) == (32, 4)
    assert (cfg.bwd.BT, cfg.bwd.BV, cfg.bwd.num_warps) == (8, 4, 2)
    assert cfg.C == 128  # 100 rounded up to a multiple of the larger block (32)
    assert "maxnreg" not in cfg.fwd.launch_options()
    assert cfg.bwd.launch_options() == {"num_warps": 2, "maxnreg": 168}


def test_bad_overrides_are_clear_errors():
    with pytest.raises(BackendError, match="power of two"):
        choose_config(2048, 16, 1536, 64, CUDA, block_v=6)
    with pytest.raises(InputError, match="pair"):
        choose_config(2048, 16, 1536, 64, CUDA, block_t=(8, 8, 8))
    with pytest.raises(BackendError, match="max_registers"):
        choose_config(2048, 16, 1536, 64, CUDA, max_registers=(None, 512))
    with pytest.raises(InputError, match="chunk_size"):
        choose_config(2048, 16, 1536, 0, CUDA)


def test_slab_default_and_environment(monkeypatch):
    assert DEFAULT_SLAB == "auto"   # the launcher's choice (slab_choice); the config itself: registers
    cfg = choose_config(2048, 16, 1536, 64, CUDA)
    assert (cfg.slab, cfg.C, cfg.slots, cfg.segments) == ("registers", 128, 16, 1)
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB", "global")
    cfg = choose_config(2048, 16, 1536, 64, CUDA)
    assert (cfg.slab, cfg.C, cfg.slots, cfg.segments) == ("global", 64, 8, 1)
    assert choose_config(2048, 16, 1536, 64, CUDA, slab="registers").slab == "registers"  # the argument wins


def test_register_slab_checkpoint_interval():
    """The register slab checkpoints every BT · slots · segments tokens, slots a power of two."""
    reg = dict(slab="registers")
    cfg = choose_config(2048, 16, 1536, 64, CUDA, **reg)
    assert (cfg.bwd.BT, cfg.slots, cfg.C, cfg.segments) == (8, REG_SLOTS, 8 * REG_SLOTS, 1)
    # a longer chunk_size is rounded up to a power of two of blocks, up to MAX_REG_SLOTS
    assert choose_config(2048, 16, 1536, 200, CUDA, **reg).slots == 32
    assert choose_config(2048, 16, 1536, 4096, CUDA, **reg).slots == MAX_REG_SLOTS
    # explicit slots and segments
    cfg = choose_config(2048, 16, 1536, 64, CUDA, slab_slots=4, slab_segments=8, **reg)
    assert (cfg.slots, cfg.segments, cfg.C) == (4, 8, 256)
    cfg = choose_config(8192, 16, 1536, 64, CUDA, slab_segments=16, **reg)
    assert (cfg.slots, cfg.segments, cfg.C) == (16, 16, 2048)
    # never more than the sequence needs, never shorter than the forward's block
    cfg = choose_config(100, 16, 1536, 64, CUDA, slab_segments=16, **reg)
    assert cfg.C >= 100 and cfg.slots * cfg.segments * cfg.bwd.BT == cfg.C and cfg.C <= 256
    cfg = choose_config(2048, 16, 1536, 64, CUDA, block_t=(64, 8), slab_slots=2, **reg)
    assert cfg.C % 64 == 0 and cfg.slots == 8


def test_slab_segments_environment(monkeypatch):
    """``$OLSM_ELEMENTWISE_SLAB_SEGMENTS`` sets the segments of calls that name none."""
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "8")
    cfg = choose_config(2048, 16, 1536, 64, CUDA)
    assert (cfg.slab, cfg.slots, cfg.segments, cfg.C) == ("registers", 16, 8, 1024)
    assert choose_config(2048, 16, 1536, 64, CUDA, slab_segments=2).segments == 2   # the argument wins
    assert choose_config(256, 16, 1536, 64, CUDA).segments == 2      # never more than the sequence needs
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "1")
    assert choose_config(2048, 16, 1536, 64, CUDA).C == 128
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "")
    assert choose_config(2048, 16, 1536, 64, CUDA).segments == 1
    for bad in ("0", "3", "eight", "-4"):
        monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", bad)
        with pytest.raises(BackendError, match="OLSM_ELEMENTWISE_SLAB_SEGMENTS"):
            choose_config(2048, 16, 1536, 64, CUDA)
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "4")
    assert choose_config(2048, 16, 1536, 64, CUDA, slab_segments=1).segments == 1   # an explicit 1 wins
    cfg = choose_config(2048, 16, 1536, 64, CUDA, slab="global")     # a call naming the global slab keeps it
    assert (cfg.slab, cfg.segments) == ("global", 1)
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB", "global")            # both from the environment: a conflict
    with pytest.raises(InputError, match="OLSM_ELEMENTWISE_SLAB_SEGMENTS=4 needs slab='registers'"):
        choose_config(2048, 16, 1536, 64, CUDA)


def test_carry_block(monkeypatch):
    """The split's carry pass walks the backward's blocks by default (run 21: 32-token ones
    slowed longhorn_diag's split row); ``$OLSM_ELEMENTWISE_CARRY_BT`` sets a longer one (for the
    GPU A/B), never more than C's largest power-of-two divisor."""
    cfg = choose_config(8192, 16, 1536, 64, CUDA)
    assert (cfg.C, cfg.bwd.BT, carry_block(cfg)) == (128, 8, 8) and CARRY_BT is None
    monkeypatch.setenv("OLSM_ELEMENTWISE_CARRY_BT", "32")
    assert carry_block(cfg) == 32
    assert carry_block(choose_config(2048, 16, 1536, 8, CUDA, slab="global")) == 16   # C = 16
    assert carry_block(choose_config(2048, 16, 1536, 48, CUDA, slab="global")) == 16  # C = 48 = 3 · 16
    for bad in ("0", "12", "x"):
        monkeypatch.setenv("OLSM_ELEMENTWISE_CARRY_BT", bad)
        with pytest.raises(BackendError, match="OLSM_ELEMENTWISE_CARRY_BT"):
            carry_block(cfg)


def test_slab_errors():
    with pytest.raises(InputError, match="slab"):
        choose_config(2048, 16, 1536, 64, CUDA, slab="shared")
    with pytest.raises(InputError, match="slab_segments"):
        choose_config(2048, 16, 1536, 64, CUDA, slab="global", slab_segments=4)
    with pytest.raises(BackendError, match="power of two"):
        choose_config(2048, 16, 1536, 64, CUDA, slab="registers", slab_slots=3)


def test_backward_split_where_the_h200_measured_it():
    """Run 19 (H200, 132 SMs): four segments won at B = 2, T = 8192, d_model 768 (768 backward
    programs), lost at d_model 1024 (1024 programs, one full wave) and at B = 8, T = 2048."""
    cfg = choose_config(8192, 16, 1536, 64, CUDA)
    assert default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=False, sms=132) == 4
    assert default_backward_split(cfg, 2, 8192, 2048, CUDA, packed=False, sms=132) == 1
    assert default_backward_split(choose_config(2048, 16, 1536, 64, CUDA), 8, 2048, 1536, CUDA, packed=False, sms=132) == 1
    # packed sequences are never split by default
    assert default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=True, sms=132) == 1
    # segments come in whole checkpoint intervals: four of 2048 tokens here
    assert backward_segments(cfg, 8192, 4) == 2048


def test_backward_split_model():
    """Waves of BWD_PROGRAMS_PER_SM programs per SM: the smallest S of the best modelled time,
    taken at SPLIT_GAIN or better, segments at least MIN_SPLIT_TOKENS long."""
    assert auto_backward_split(768, 8192, 132) == 4       # 1 wave -> 3 waves of walks 4x shorter
    assert auto_backward_split(384, 8192, 132) == 8
    assert auto_backward_split(384, 2048, 132) == 2       # only 2 segments of 1024 tokens
    assert auto_backward_split(384, 2047, 132) == 1
    assert auto_backward_split(1056, 8192, 132) == 1      # a full wave: nothing to gain
    # a second wave of 44 programs walking whole sequences: 2 walks -> 9 waves of 1/8 walks
    assert auto_backward_split(1100, 8192, 132) == 8
    assert auto_backward_split(1, 1 << 20, 132) == 8      # capped at MAX_AUTO_SPLIT


def test_backward_split_environment(monkeypatch):
    cfg = choose_config(8192, 16, 1536, 64, CUDA)
    monkeypatch.setenv("OLSM_ELEMENTWISE_BWD_SPLIT", "1")
    assert default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=False, sms=132) == 1
    monkeypatch.setenv("OLSM_ELEMENTWISE_BWD_SPLIT", "3")
    assert default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=True, sms=132) == 3
    monkeypatch.setenv("OLSM_ELEMENTWISE_BWD_SPLIT", "auto")
    assert default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=False, sms=132) == 4
    for bad in ("0", "two", "-2"):
        monkeypatch.setenv("OLSM_ELEMENTWISE_BWD_SPLIT", bad)
        with pytest.raises(BackendError, match="OLSM_ELEMENTWISE_BWD_SPLIT"):
            default_backward_split(cfg, 2, 8192, 1536, CUDA, packed=False, sms=132)


def test_grads_slab_blocks_and_interval(monkeypatch):
    """The gradient-buffer slab: backward blocks of at least BK tokens (row k of a state in token
    k), one checkpoint every GRADS_C tokens by default (at most the sequence), or BT · slots;
    segments and shorter blocks are refused."""
    assert GRADS_C == 2048
    cfg = choose_config(8192, 16, 1536, 64, CUDA, slab="grads")
    assert (cfg.slab, cfg.bwd.BT, cfg.bwd.BV, cfg.C, cfg.slots, cfg.segments) == ("grads", 16, 4, 2048, 128, 1)
    assert choose_config(1000, 16, 1536, 64, CUDA, slab="grads").C == 1024      # one interval covers T
    assert choose_config(8192, 16, 1536, 4096, CUDA, slab="grads").C == 4096    # a longer chunk_size wins
    assert choose_config(8192, 16, 1536, 64, CUDA, slab="grads", slab_slots=64).C == 1024
    assert choose_config(8192, 64, 64, 64, CUDA, slab="grads").bwd.BT == 64      # K = 64: 64-token blocks
    with pytest.raises(BackendError, match="block_t >= 16"):
        choose_config(8192, 16, 1536, 64, CUDA, slab="grads", block_t=(None, 8))
    with pytest.raises(InputError, match="slab_segments=8 needs slab='registers'"):
        choose_config(8192, 16, 1536, 64, CUDA, slab="grads", slab_segments=8)
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "8")    # a default for the register slab only
    assert choose_config(8192, 16, 1536, 64, CUDA, slab="grads").segments == 1
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB", "grads")         # both from the environment: a conflict
    with pytest.raises(InputError, match="needs slab='registers'"):
        choose_config(8192, 16, 1536, 64, CUDA)


def test_auto_slab_takes_the_gradient_slab_where_it_compiles_lean():
    """``slab="auto"``: the gradient-buffer slab when a backward is recorded on a GPU, the
    buffers have room and nothing pins the register slab, and its kernel spills at most
    GRADS_MAX_SPILL bytes; otherwise the register slab, without compiling the probe. A probe
    that fails falls back with a warning. An explicit slab is taken as it is."""
    from olsm.kernels.elementwise.slab_choice import GRADS_MAX_SPILL, choose_slab

    probes = []

    def spills(n):
        def probe():
            probes.append(n)
            return n
        return probe

    ok = dict(need_grad=True, compiled=True, cells=True, pinned=False)
    assert GRADS_MAX_SPILL == 256
    assert choose_slab("auto", spills=spills(192), **ok) == "grads"          # mamba1 on the H200
    assert choose_slab("auto", spills=spills(624), **ok) == "registers"      # longhorn_diag
    assert probes == [192, 624]
    for off in ("need_grad", "compiled", "cells"):
        assert choose_slab("auto", spills=spills(0), **dict(ok, **{off: False})) == "registers"
    assert choose_slab("auto", spills=spills(0), **dict(ok, pinned=True)) == "registers"
    assert probes == [192, 624]                                               # no probe compiled for those
    for slab in ("global", "registers", "grads"):
        assert choose_slab(slab, spills=spills(10**6), **ok) == slab

    def broken():
        raise FileNotFoundError("cuobjdump")
    with pytest.warns(RuntimeWarning, match="register slab"):
        assert choose_slab("auto", spills=broken, **ok) == "registers"
