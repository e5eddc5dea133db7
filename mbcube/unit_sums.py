"""Sums of per-cell glacier statistics over units (regions) made of glaciers.

A cell is one non-empty (glacier, elevation bin, surface) of the combined statistics. A unit's
sums per (bin, surface) are taken over its member glaciers' cells; a glacier may belong to
several units (a region, 'all', the same without surge-type glaciers). Glaciers that belong to
the same units form an atom: the cells are summed per atom with one bincount per field, and
each unit is the sum of its atoms (a small matrix product). Cost ~ cells + units x atoms x
cells per glacier, plain numpy (no JIT start-up in a fresh `mbcube aggregate` process).
"""

from __future__ import annotations

import numpy as np

#: The summed fields, in the order of the result's second axis.
UNIT_FIELDS = (
    "count",  # measured pixels of the cells measured enough (>= min_px_per_bin)
    "weight",  # area (m2) of those cells
    "rate_sum",  # their area x mean rate (m3/yr)
    "dh_sum",  # their area x mean dh (m3)
    "area_m2",  # area (m2) of all cells
    "n_px",  # pixels of all cells
    "measured_bin_px",  # best scene's measured pixels of the cells measured enough
)


def atoms(membership: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patterns (A, U) bool, atom of each glacier (G,)): the distinct unit sets of the glaciers
    of a (U, G) 0/1 membership."""
    member = np.asarray(membership, dtype=bool)
    packed = np.ascontiguousarray(np.packbits(member, axis=0).T)  # (G, bytes): its units
    code = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, atom_of = np.unique(code, return_index=True, return_inverse=True)
    return member.T[first], atom_of.ravel()


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
    patterns, atom_of = atoms(membership)

    def column(name: str) -> np.ndarray:
        return np.asarray(values[name], dtype=np.float64)

    count, area = column("count"), column("area_m2")
    valid = count >= min_px_per_bin
    share = np.divide(area, column("weight"), out=np.zeros(count.shape), where=valid)
    fields = (
        np.where(valid, count, 0.0),
        np.where(valid, area, 0.0),
        share * column("rate_sum"),
        share * column("dh_sum"),
        area,
        column("n_px"),
        np.where(valid, column("measured_bin_px"), 0.0),
    )
    key = atom_of[np.asarray(glacier, dtype=np.int64)] * n_cells + np.asarray(cell, np.int64)
    size = len(patterns) * n_cells
    per_atom = np.stack([np.bincount(key, weights=f, minlength=size) for f in fields])
    per_atom = per_atom.reshape(len(fields), len(patterns), n_cells)
    return np.tensordot(patterns.T.astype(np.float64), per_atom, axes=([1], [1]))
