"""Stitching tiles: integer-cycle offsets between the valid-mask regions of overlapping tiles,
solved over the tile-region graph with a maximum spanning forest, with loop-closure checks.

Nodes are the 4-connected regions of the valid mask inside each tile window (not the engine's
component labels). Two regions of overlapping tiles are linked when they share valid pixels;
the edge's cycle offset d is the most frequent rint((phase_a - phase_b) / 2 pi) on the shared
pixels, its weight the number of shared pixels that agree with d. Edges with too few agreeing
pixels, or agreeing on too small a fraction, are dropped. Kruskal's algorithm on the weights
(heaviest first) with a weighted union-find builds the forest and the offsets at once; every
kept edge that closes a loop is checked (a misfit is a loop whose offsets do not close).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mbcube.unwrap.tiles import TileResult


@dataclass
class EdgeStats:
    """Region pairs of two overlapping tiles (0-based region indices in tile a and tile b):
    cycle offset d (phase_a - phase_b = 2 pi d), agreeing and shared pixel counts."""

    region_a: np.ndarray
    region_b: np.ndarray
    d_cycles: np.ndarray
    n_agree: np.ndarray
    n_shared: np.ndarray


def edge_stats(a: TileResult, b: TileResult) -> EdgeStats:
    """Compare two tile results on the pixels their windows share."""
    r0, r1 = max(a.tile.rows[0], b.tile.rows[0]), min(a.tile.rows[1], b.tile.rows[1])
    c0, c1 = max(a.tile.cols[0], b.tile.cols[0]), min(a.tile.cols[1], b.tile.cols[1])
    empty = np.zeros(0, np.int64)
    if r0 >= r1 or c0 >= c1 or a.n_regions == 0 or b.n_regions == 0:
        return EdgeStats(empty, empty, empty, empty, empty)

    def cut(res: TileResult) -> tuple[np.ndarray, np.ndarray]:
        rs = slice(r0 - res.tile.rows[0], r1 - res.tile.rows[0])
        cs = slice(c0 - res.tile.cols[0], c1 - res.tile.cols[0])
        return res.labels[rs, cs], res.phase_rad[rs, cs]

    la, pa = cut(a)
    lb, pb = cut(b)
    both = (la > 0) & (lb > 0)
    if not both.any():
        return EdgeStats(empty, empty, empty, empty, empty)
    pair = (la[both].astype(np.int64) - 1) * b.n_regions + (lb[both].astype(np.int64) - 1)
    d = np.rint((pa[both].astype(np.float64) - pb[both]) / (2 * np.pi)).astype(np.int64)
    d_lo = d.min()
    width = int(d.max() - d_lo) + 1
    keys, counts = np.unique(pair * width + (d - d_lo), return_counts=True)
    pair_of, d_of = keys // width, keys % width + d_lo
    # per pair: total shared pixels and the most frequent offset (ties: the first, smallest d)
    uniq, first = np.unique(pair_of, return_index=True)
    shared = np.add.reduceat(counts, first)
    order = np.lexsort((d_of, -counts, pair_of))  # within a pair: most frequent first
    best = order[np.searchsorted(pair_of[order], uniq)]
    return EdgeStats(
        uniq // b.n_regions,
        uniq % b.n_regions,
        d_of[best],
        counts[best].astype(np.int64),
        shared.astype(np.int64),
    )


@dataclass
class Stitched:
    """The solved graph: per node (global region index) its offset in cycles relative to its
    component's root and its component root; and the edge bookkeeping for quality numbers."""

    offset_cycles: np.ndarray  # int64 per node
    root: np.ndarray  # int64 per node
    n_edges_kept: int
    n_edges_tree: int
    loop_misfits: int
    n_agree_total: int
    n_shared_total: int
    misfit_edges: list[tuple[int, int]] = field(default_factory=list)


def _find(parent: list[int], pot: list[int], x: int) -> tuple[int, int]:
    """Root of x and offset(x) - offset(root), compressing the path."""
    path = []
    while parent[x] != x:
        path.append(x)
        x = parent[x]
    root = x
    acc = 0
    for node in reversed(path):  # from the root's child down to the start
        acc += pot[node]
        pot[node] = acc
        parent[node] = root
    return root, (pot[path[0]] if path else 0)


def solve_offsets(
    n_nodes: int,
    node_a: np.ndarray,
    node_b: np.ndarray,
    d_cycles: np.ndarray,
    n_agree: np.ndarray,
    n_shared: np.ndarray,
    *,
    min_edge_px: int,
    min_edge_agreement: float,
) -> Stitched:
    """Integer-cycle offsets of the nodes so that offset_b - offset_a = d on every tree edge
    (phase_a + 2 pi offset_a = phase_b + 2 pi offset_b), by a maximum spanning forest on the
    agreeing-pixel counts of the kept edges (>= min_edge_px agreeing, and agreeing on at least
    min_edge_agreement of the shared pixels). Kept edges outside the forest are loop closures:
    each one whose offsets do not close is counted as a misfit."""
    keep = (n_agree >= min_edge_px) & (n_agree >= min_edge_agreement * n_shared)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-n_agree[idx], kind="stable")]
    parent = list(range(n_nodes))
    pot = [0] * n_nodes
    size = [1] * n_nodes
    n_tree = 0
    misfits: list[tuple[int, int]] = []
    for e in idx.tolist():
        u, v, d = int(node_a[e]), int(node_b[e]), int(d_cycles[e])
        ru, pu = _find(parent, pot, u)
        rv, pv = _find(parent, pot, v)
        if ru == rv:
            if pv - pu != d:
                misfits.append((u, v))
            continue
        n_tree += 1
        # offset_v - offset_u = d with offset_x = offset_root(x) + p_x
        if size[ru] >= size[rv]:
            parent[rv], pot[rv] = ru, d - pv + pu
            size[ru] += size[rv]
        else:
            parent[ru], pot[ru] = rv, -(d - pv + pu)
            size[rv] += size[ru]
    offsets = np.zeros(n_nodes, np.int64)
    roots = np.zeros(n_nodes, np.int64)
    for x in range(n_nodes):
        roots[x], offsets[x] = _find(parent, pot, x)
    return Stitched(
        offsets,
        roots,
        int(idx.size),
        n_tree,
        len(misfits),
        int(n_agree.sum()),
        int(n_shared.sum()),
        misfits,
    )
