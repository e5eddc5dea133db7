"""Tie each stitched component to stable ground by a whole number of cycles.

A component with at least `min_stable_px_to_tie` stable pixels is shifted by
k = rint(median(dh_stable / h_amb)) = rint(median(phase_unw_stable / 2 pi)) cycles, so that dh on
its stable ground is near 0 (the reference DEM's error is far below h_amb / 2; the datum
correction later removes the sub-cycle remainder). The others are untied: their cycle is
unknown, so their dh is flagged (NaN), never mixed in.

The median is taken from histograms of phase / 2 pi in bins of 1/64 cycle (summed over tiles
after each region's stitching offset), so the solve never holds the pixels themselves; k is
exact unless the median lies within 1/64 cycle of a half cycle, where the choice is a toss-up.
"""

from __future__ import annotations

import numpy as np


def tie_cycles(
    root: np.ndarray,
    offset_cycles: np.ndarray,
    hist_node: np.ndarray,
    hist_bin: np.ndarray,
    hist_count: np.ndarray,
    *,
    bins_per_cycle: int,
    min_stable_px_to_tie: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node (indexed like `root`): the tie in cycles of its component, whether it is tied,
    and its component's stable pixel count.

    hist_*: stable-ground histogram entries: node, bin (floor(phase / 2 pi * bins_per_cycle)
    before the node's stitching offset) and count."""
    n = root.size
    k_of_root = np.zeros(n, np.int64)
    stable_of_root = np.zeros(n, np.int64)
    if hist_node.size:
        comp = root[hist_node]
        shifted = hist_bin + offset_cycles[hist_node] * bins_per_cycle
        order = np.lexsort((shifted, comp))
        comp, shifted, count = comp[order], shifted[order], hist_count[order]
        roots, first = np.unique(comp, return_index=True)
        totals = np.add.reduceat(count, first)
        cum = np.cumsum(count)
        before = (
            np.concatenate(([0], cum[first[1:] - 1])) if roots.size > 1 else np.zeros(1, np.int64)
        )
        # first entry of each component whose cumulative count reaches half its total
        target = before + (totals + 1) // 2
        at = np.searchsorted(cum, target, side="left")
        median_cycles = (shifted[at] + 0.5) / bins_per_cycle
        k_of_root[roots] = np.rint(median_cycles).astype(np.int64)
        stable_of_root[roots] = totals
    tied_root = stable_of_root >= min_stable_px_to_tie
    return (
        np.where(tied_root[root], k_of_root[root], 0),
        tied_root[root],
        stable_of_root[root],
    )
