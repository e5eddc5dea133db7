"""Sums of per-glacier and per-cell glacier statistics over units (regions) made of glaciers.

A cell is one non-empty (glacier, elevation bin, surface) of the combined statistics. A glacier
may belong to several units (a region, 'all', the same without surge-type glaciers). Glaciers
that belong to the same units form an atom: values are summed per atom with one bincount per
field (cells: `np.add.at` over blocks of CELL_BLOCK cells, the same additions in the same
order), and each unit is the sum of its atoms. Cost ~ glaciers (or cells) + units x atoms, plain
numpy without BLAS: no thread pool spun up for tiny products, no JIT start-up in a fresh
`mbcube aggregate` process. Per-glacier values go from atoms to units by a small product
(`np.einsum` without `optimize`); per-cell sums (atoms x bins x surfaces x fields, wide rows) by
adding each unit's own atoms' rows, in atom order (`Units.totals`): the same additions in the same
order as the product, without the products by zero of the atoms outside the unit.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

#: The summed cell fields, in the order of `Units.cell_sums`' second axis.
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
    member = np.ascontiguousarray(membership, dtype=bool)
    n_units, n_glaciers = member.shape
    n_bytes = -(-n_units // 8)
    width = max(8, -(-n_bytes // 8) * 8)  # whole uint64 words: <= 64 units sort as ints
    # each glacier's units as np.packbits packs them (unit 8 j + k: bit 7 - k of byte j), by
    # shifts of whole rows (no (G, U) transposed copy; packbits along axis 0 is 3x slower)
    packed = np.zeros((n_bytes, n_glaciers), dtype=np.uint8)
    rows = member.view(np.uint8)
    full = n_units // 8
    for k in range(8):
        if full:
            packed[:full] |= rows[: 8 * full].reshape(full, 8, n_glaciers)[:, k] << (7 - k)
        if 8 * full + k < n_units:
            packed[full] |= rows[8 * full + k] << (7 - k)
    words = np.zeros((n_glaciers, width), dtype=np.uint8)
    words[:, :n_bytes] = packed.T
    # atoms ordered by code: <= 64 units as one native uint64; more as their bytes (memcmp),
    # i.e. big-endian words compared in turn (np.lexsort: 4x np.unique on 16-byte voids)
    if width == 8:
        keys = [words.view(np.uint64)[:, 0]]
        order = np.argsort(keys[0], kind="stable")
    else:
        big = words.view(">u8")
        keys = [big[:, i] for i in range(big.shape[1])]
        order = np.lexsort(keys[::-1])  # stable; the last key is the primary one
    new = np.zeros(len(order), dtype=bool)  # first glacier of each atom, in sorted order
    new[:1] = True
    for key in keys:
        found = key[order]
        new[1:] |= found[1:] != found[:-1]
    atom_of = np.empty(len(order), dtype=np.int64)
    atom_of[order] = np.cumsum(new) - 1
    return member.T[order[new]], atom_of


#: Cells per block in `Units.cell_sums`: the per-block arrays (64 KiB) stay in the allocator's
#: reused memory (fresh pages per call cost more than the sums on a virtual machine).
CELL_BLOCK = 1 << 13


@dataclass(frozen=True)
class Units:
    """U units made of G glaciers, kept as atoms (`atoms`): patterns (A, U) 0/1 as float64,
    atom_of (G,) each glacier's atom."""

    patterns: np.ndarray
    atom_of: np.ndarray

    @classmethod
    def of(cls, membership: np.ndarray) -> Units:
        """From a (U, G) 0/1 membership (glacier g belongs to unit u)."""
        patterns, atom_of = atoms(membership)
        return cls(patterns.astype(np.float64), atom_of.astype(np.int64))

    @property
    def n_units(self) -> int:
        return self.patterns.shape[1]

    @functools.cached_property
    def members(self) -> list[np.ndarray]:
        """Each unit's atoms (increasing atom positions)."""
        unit, atom = np.nonzero(self.patterns.T)
        bounds = np.searchsorted(unit, np.arange(self.n_units + 1))
        return [atom[lo:hi] for lo, hi in itertools.pairwise(bounds)]

    def count(self) -> np.ndarray:
        """(U,) int64: each unit's glaciers."""
        per_atom = np.bincount(self.atom_of, minlength=len(self.patterns))
        return np.einsum("a,au->u", per_atom, self.patterns.astype(np.int64))

    def totals(self, per_atom: np.ndarray) -> np.ndarray:
        """(U, W) sums over each unit's atoms of per-atom rows (A, W), W >= 2, added one atom
        after another in atom order from 0.0 (as the product with the patterns adds them; a
        unit of no atom is 0). Cost ~ unit memberships x W, not units x atoms x W."""
        per_atom = np.asarray(per_atom, dtype=np.float64)
        if per_atom.ndim != 2 or per_atom.shape[1] < 2:
            raise ValueError(f"per_atom must be (atoms, >= 2 columns), got {per_atom.shape}")
        out = np.zeros((self.n_units, per_atom.shape[1]))
        for u, atoms_u in enumerate(self.members):
            if len(atoms_u) == 1:
                out[u] += per_atom[atoms_u[0]]
            elif len(atoms_u):
                # a reduction along the outer axis of a C-contiguous (k, W >= 2) array: row
                # after row (numpy's pairwise summation is along the contiguous axis only)
                out[u] += per_atom[atoms_u].sum(axis=0)
        return out

    def sum(self, values: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
        """(..., U) sums over each unit's glaciers of per-glacier values (..., G), each times
        `factor` (G,) when given. Row by row (one bincount per row of G values: no temporary
        of the size of `values`)."""
        values = np.asarray(values, dtype=np.float64)
        flat = values.reshape(int(np.prod(values.shape[:-1])), values.shape[-1])
        n_rows, n_atoms = len(flat), len(self.patterns)
        per_atom = np.empty((n_rows, n_atoms))
        for r in range(n_rows):
            row = flat[r] if factor is None else flat[r] * factor
            per_atom[r] = np.bincount(self.atom_of, weights=row, minlength=n_atoms)
        return np.einsum("ka,au->ku", per_atom, self.patterns).reshape(
            *values.shape[:-1], self.n_units
        )

    def cell_sums(
        self,
        glacier: np.ndarray,
        cell: np.ndarray,
        values: dict[str, np.ndarray],
        n_cells: int,
        min_px_per_bin: int,
    ) -> np.ndarray:
        """(U, 7, n_cells) sums of UNIT_FIELDS per unit and cell index (bin x surface, flat).

        glacier, cell: (C,) each cell's glacier position (0..G-1) and flat (bin, surface) index;
        values: per-cell count, area_m2, weight (area of the measured share, m2), rate_sum
        (m3/yr), dh_sum (m3), n_px, measured_bin_px, each (C,). A cell counts as measured when
        its count >= min_px_per_bin; its mean rate is rate_sum / weight (m/yr)."""

        def column(name: str) -> np.ndarray:
            return np.asarray(values[name], dtype=np.float64)

        count, area, weight = column("count"), column("area_m2"), column("weight")
        rate_sum, dh_sum = column("rate_sum"), column("dh_sum")
        n_px, measured_px = column("n_px"), column("measured_bin_px")
        glacier = np.asarray(glacier, dtype=np.int64)
        cell = np.asarray(cell, dtype=np.int64)
        n_atoms = len(self.patterns)
        size = n_atoms * n_cells
        # (atom, cell, field) sums; cells not measured enough go to one more bin, dropped
        acc = np.zeros((size + 1, len(UNIT_FIELDS)))
        for start in range(0, len(glacier), CELL_BLOCK):
            part = slice(start, start + CELL_BLOCK)
            valid = count[part] >= min_px_per_bin
            key = self.atom_of[glacier[part]] * n_cells + cell[part]
            measured = np.where(valid, key, size)
            share = np.divide(area[part], weight[part], out=np.zeros(len(key)), where=valid)
            np.add.at(acc[:, 0], measured, count[part])
            np.add.at(acc[:, 1], measured, area[part])
            np.add.at(acc[:, 2], measured, share * rate_sum[part])
            np.add.at(acc[:, 3], measured, share * dh_sum[part])
            np.add.at(acc[:, 4], key, area[part])
            np.add.at(acc[:, 5], key, n_px[part])
            np.add.at(acc[:, 6], measured, measured_px[part])
        summed = self.totals(acc[:size].reshape(n_atoms, n_cells * len(UNIT_FIELDS)))
        return summed.reshape(self.n_units, n_cells, len(UNIT_FIELDS)).transpose(0, 2, 1)
