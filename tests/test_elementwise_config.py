"""Launch shapes of the elementwise-gate kernels (``olsm.kernels.elementwise.config``).

The GPU defaults were chosen by measurement (benchmarks/README.md, H200 sweeps); these tests pin
them, so a change to the heuristic is a visible decision, and check the override rules.
"""
import pytest
import torch

from olsm.errors import BackendError, InputError
from olsm.kernels.elementwise.config import MAX_BT, MIN_BT, TILE_ELEMS, Tile, choose_config

CUDA = torch.device("cuda")  # constructing the device needs no GPU


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    # the GPU heuristic, not the interpreter's small tiles
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_measured_defaults_at_the_paper_shape():
    cfg = choose_config(2048, 16, 1536, 64, CUDA)
    assert (cfg.BK, cfg.C) == (16, 64)
    assert cfg.fwd == Tile(BT=16, BV=8, num_warps=1)
    assert cfg.bwd == Tile(BT=8, BV=4, num_warps=1)
    assert cfg.bwd.launch_options() == {"num_warps": 1}


@pytest.mark.parametrize("K,V,T", [(16, 1536, 2048), (64, 128, 1000), (256, 256, 3), (5, 3, 1), (100, 7, 77)])
def test_tiles_are_powers_of_two_within_bounds(K, V, T):
    cfg = choose_config(T, K, V, 64, CUDA)
    for t in (cfg.fwd, cfg.bwd):
        for x in (t.BT, t.BV, t.num_warps):
            assert x >= 1 and x & (x - 1) == 0
        assert t.BT <= max(MAX_BT, 1) and (t.BT >= MIN_BT or t.BT >= T)
        assert t.BV <= max(8, V)
    assert cfg.BK >= K and cfg.C % max(cfg.fwd.BT, cfg.bwd.BT) == 0 and cfg.C >= 64
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
