"""The fused expand's program order and its L2 rule (routedlora/ops/tile_order.py), on hand-counted cases."""
import pytest

from routedlora.ops.tile_order import TileOrder, best_group

MB = 2**20


@pytest.mark.parametrize("tiles,cols,group", [(5, 4, 1), (5, 4, 2), (5, 4, 3), (5, 4, 8), (1, 7, 4), (9, 1, 4)])
def test_every_program_is_one_tile_column_pair(tiles, cols, group):
    order = TileOrder(tiles, cols, group)
    pairs = [order.program(p) for p in range(tiles * cols)]
    assert sorted(pairs) == [(t, c) for t in range(tiles) for c in range(cols)]
    if group == 1:  # column-fastest: the kernel's order before grouping
        assert pairs == [(t, c) for t in range(tiles) for c in range(cols)]
    elif tiles > 1:  # inside a group, token tiles fastest
        assert pairs[:2] == [(0, 0), (1, 0)]


def test_everything_fits_each_tile_read_once():
    order = TileOrder(4, 3, 1, {"x": (1, 2, 3, 4)}, {"w": (10, 20, 30)})
    assert order.hbm_bytes(l2=10**6, sms=2) == {"x": 10, "w": 60}
    # resident arguments take their room: 60 bytes left hold the panels but not the tiles too
    assert order.hbm_bytes(l2=10**6, sms=2, resident=10**6 - 60)["w"] > 60


def test_inside_a_wave_a_shared_tile_is_read_once_even_when_nothing_fits():
    # 4 programs per wave; L2 too small for any reuse across waves
    order = TileOrder(2, 4, 1, {"x": (8, 8)}, {"w": (5, 5, 5, 5)})
    # waves: tile 0 x cols 0..3, then tile 1 x cols 0..3: x read once per wave, every panel twice
    assert order.hbm_bytes(l2=1, sms=4) == {"x": 16, "w": 40}
    # with room: the second wave finds the panels in L2
    assert order.hbm_bytes(l2=100, sms=4) == {"x": 16, "w": 20}


def test_a_weight_larger_than_l2_streams_once_per_group():
    # 8 token tiles of 1 MB, 32 panels of 4 MB (128 MB of weight), 50 MB of L2, 16 programs a wave
    tiles, cols = (MB,) * 8, (4 * MB,) * 32
    column_fastest = TileOrder(8, 32, 1, {"x": tiles}, {"w": cols}).hbm_bytes(50 * MB, 16)
    assert column_fastest["w"] == 8 * 128 * MB  # every token tile streams the whole weight
    grouped = TileOrder(8, 32, 8, {"x": tiles}, {"w": cols}).hbm_bytes(50 * MB, 16)
    assert grouped == {"x": 8 * MB, "w": 128 * MB}  # one group: each panel once, x tiles stay in L2
    assert best_group(8, tiles, cols, 50 * MB, 16) == 8


def test_a_weight_that_fits_keeps_the_column_fastest_order():
    # 32 MB of weight: a wave of column-fastest programs reads it all and the next finds it in L2
    tiles, cols = (MB // 2,) * 64, (MB,) * 32
    assert best_group(64, tiles, cols, 50 * MB, 132) == 1
    assert TileOrder(64, 32, 1, {"x": tiles}, {"w": cols}).hbm_bytes(50 * MB, 132) == {"x": 32 * MB, "w": 32 * MB}
