"""The order in which a tiled GEMM's programs run, and what it costs in main-memory reads.

A kernel whose programs are (token tile, column) pairs — the fused expand: ``x`` rows of a token
tile times a column panel of the base weight — reads every ``x`` tile once per column and every
weight panel once per token tile. Whether those re-reads come from L2 or from HBM depends on the
order the programs run in: the GPU runs them in waves of about one per SM, in grid order.

``_expand_kernel`` runs them *grouped*: ``group`` token tiles at a time, token tile fastest inside
a group, then the columns (the classic L2 swizzle). ``group = 1`` is column-fastest: a wave reads
a few token tiles against every panel (best while the weight fits in L2); a larger group reads
``group`` tiles against fewer panels per wave, so a weight larger than L2 is streamed from HBM
once per group instead of once per token tile.

:meth:`TileOrder.hbm_bytes` is the rule both the launcher (to choose ``group``) and the cost
harness (to price a launch) use: programs run in waves of ``sms`` consecutive programs; inside a
wave a tile read by several programs comes from HBM once (they run side by side and walk the
inner dimension at the same pace, so each slice is read by the first and found in L2 by the
others); across waves L2 is a least-recently-used cache of whole tiles, its size less the
resident arguments (the small ones every program re-reads), a wave's tiles all used at once. A
model of the cache, stated so it can be checked, not a measurement.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Tuple

# an H100 SXM5: its SM count (waves) and L2 size; the launcher's defaults off a GPU and the cost model's
H100_SMS = 132
H100_L2_BYTES = 50 * 2**20
GROUPS = (1, 2, 4, 8, 16, 32, 64)  # the group sizes the launcher chooses from


@dataclass(frozen=True)
class TileOrder:
    """Programs ``pid = 0 .. tiles*cols-1`` as ``_expand_kernel`` maps them to (token tile, column).

    ``by_tile[a][t]``: bytes of argument ``a`` that token tile ``t``'s programs read (``x`` rows);
    ``by_col[a][c]``: bytes of ``a`` that column ``c``'s programs read (a weight panel)."""

    tiles: int
    cols: int
    group: int
    by_tile: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    by_col: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def program(self, pid: int) -> Tuple[int, int]:
        """(token tile, column) of program ``pid`` — the kernel's own arithmetic."""
        per_group = self.group * self.cols
        first = (pid // per_group) * self.group
        size = min(self.tiles - first, self.group)
        local = pid % per_group
        return first + local % size, local // size

    def hbm_bytes(self, l2: int = H100_L2_BYTES, sms: int = H100_SMS, resident: int = 0) -> Dict[str, int]:
        """Bytes each streamed argument reads from HBM under the wave rule in the module docstring."""
        out = dict.fromkeys([*self.by_tile, *self.by_col], 0)
        cache: "OrderedDict[tuple, int]" = OrderedDict()  # (argument, tile or column) -> bytes, LRU first
        held, room = 0, l2 - resident
        programs = self.tiles * self.cols
        for start in range(0, programs, max(sms, 1)):
            pairs = [self.program(p) for p in range(start, min(programs, start + sms))]
            ts, cs = sorted({t for t, _ in pairs}), sorted({c for _, c in pairs})
            wave = [((a, t), b[t]) for a, b in self.by_tile.items() for t in ts]
            wave += [((a, c), b[c]) for a, b in self.by_col.items() for c in cs]
            for key, size in wave:
                if key in cache:
                    cache.move_to_end(key)
                else:
                    out[key[0]] += size
                    cache[key] = size
                    held += size
            while cache and held > room:
                held -= cache.popitem(last=False)[1]
        return out


def best_group(tiles: int, tile_bytes: Tuple[int, ...], col_bytes: Tuple[int, ...], l2: int, sms: int,
               resident: int = 0) -> int:
    """The group size in :data:`GROUPS` (at most ``tiles``) whose order reads the least from HBM;
    the smallest on a tie (``1``, column-fastest, while the weight fits in L2). A simulation of
    every wave: callers memoise it per shape."""
    best, best_bytes = 1, None
    for g in sorted({min(g, max(tiles, 1)) for g in GROUPS}):
        order = TileOrder(tiles, len(col_bytes), g, {"x": tile_bytes}, {"w": col_bytes})
        total = sum(order.hbm_bytes(l2, sms, resident).values())
        if best_bytes is None or total < best_bytes:
            best, best_bytes = g, total
    return best
