"""Sums of per-cell glacier statistics over units (regions) made of glaciers, in one pass.

A cell is one non-empty (glacier, elevation bin, surface) of the combined statistics. A unit's
sums per (bin, surface) are taken over its member glaciers' cells; a glacier may belong to
several units (a region, 'all', the same without surge-type glaciers). The kernel walks the
cells once and adds each to every unit holding its glacier: cost ~ cells x units per glacier,
no temporary per-cell columns and no sparse matrix product.
"""

from __future__ import annotations

import numba
import numpy as np

#: The summed fields, in the order of the kernel's second axis.
UNIT_FIELDS = (
    "count",  # measured pixels of the cells measured enough (>= min_px_per_bin)
    "weight",  # area (m2) of those cells
    "rate_sum",  # their area x mean rate (m3/yr)
    "dh_sum",  # their area x mean dh (m3)
    "area_m2",  # area (m2) of all cells
    "n_px",  # pixels of all cells
    "measured_bin_px",  # best scene's measured pixels of the cells measured enough
)


@numba.njit(nogil=True, cache=True)
def _sum_kernel(
    glacier: np.ndarray,
    cell: np.ndarray,
    count: np.ndarray,
    area_m2: np.ndarray,
    weight: np.ndarray,
    rate_sum: np.ndarray,
    dh_sum: np.ndarray,
    n_px: np.ndarray,
    measured_bin_px: np.ndarray,
    unit_ptr: np.ndarray,
    unit_index: np.ndarray,
    min_px: float,
    n_units: int,
    width: int,
) -> np.ndarray:
    out = np.zeros((n_units, 7, width))
    for i in range(glacier.shape[0]):
        g = glacier[i]
        lo, hi = unit_ptr[g], unit_ptr[g + 1]
        if lo == hi:
            continue
        c = cell[i]
        valid = count[i] >= min_px
        a = area_m2[i]
        for p in range(lo, hi):
            u = unit_index[p]
            if valid:
                out[u, 0, c] += count[i]
                out[u, 1, c] += a
                out[u, 2, c] += a * (rate_sum[i] / weight[i])
                out[u, 3, c] += a * (dh_sum[i] / weight[i])
                out[u, 6, c] += measured_bin_px[i]
            out[u, 4, c] += a
            out[u, 5, c] += n_px[i]
    return out


def unit_cell_sums(
    glacier: np.ndarray,
    cell: np.ndarray,
    values: dict[str, np.ndarray],
    membership: np.ndarray,
    n_cells: int,
    min_px_per_bin: int,
) -> np.ndarray:
    """(U, 7, n_cells) sums of UNIT_FIELDS per unit and cell index (bin x surface, flattened).

    glacier, cell: (C,) each cell's glacier position (0..G-1) and flat (bin, surface) index;
    values: per-cell count, area_m2, weight (area of the measured share, m2), rate_sum (m3/yr),
    dh_sum (m3), n_px, measured_bin_px, each (C,); membership: (U, G) 0/1. A cell counts as
    measured when its count >= min_px_per_bin; its mean rate is rate_sum / weight (m/yr)."""
    member = np.asarray(membership, dtype=bool)
    n_units, n_glaciers = member.shape
    glacier_of, unit_of = np.nonzero(member.T)  # sorted by glacier
    unit_ptr = np.searchsorted(glacier_of, np.arange(n_glaciers + 1)).astype(np.int64)

    def column(name: str) -> np.ndarray:  # strided views (columns of the cache) stay views
        return np.asarray(values[name], dtype=np.float64)

    return _sum_kernel(
        np.ascontiguousarray(glacier, dtype=np.int64),
        np.ascontiguousarray(cell, dtype=np.int64),
        column("count"),
        column("area_m2"),
        column("weight"),
        column("rate_sum"),
        column("dh_sum"),
        column("n_px"),
        column("measured_bin_px"),
        unit_ptr,
        unit_of.astype(np.int64),
        float(min_px_per_bin),
        n_units,
        n_cells,
    )
