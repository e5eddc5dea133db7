"""Deterministic noise as pure functions of map coordinates (so any tile can be made alone).

A hash of integer lattice indices and a seed gives the random numbers: the same pixel gets the
same value whichever tile, order or process computes it.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64, well mixed)."""
    h = (h ^ (h >> np.uint64(30))) * _M2
    h = (h ^ (h >> np.uint64(27))) * _M3
    return h ^ (h >> np.uint64(31))


def uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in (0, 1) from integer indices and a seed."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.int64).astype(np.uint64) * _M1
        h = _mix(h ^ (iy.astype(np.int64).astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * _M2))
        h = _mix(h + np.uint64((seed >> 32) & 0xFFFFFFFF))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def normal(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Standard normal numbers from integer indices and a seed (Box-Muller)."""
    u1 = uniform(ix, iy, seed)
    u2 = uniform(ix, iy, seed ^ 0x5DEECE66D)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def value_noise(x: np.ndarray, y: np.ndarray, scale_m: float, seed: int) -> np.ndarray:
    """Smooth random field of unit standard deviation, correlation length ~scale_m (m).

    Normal values on a lattice of spacing scale_m, blended with a quintic fade; dividing by the
    blend's own spread keeps the variance at 1 everywhere in the cell.
    """
    gx, gy = x / scale_m, y / scale_m
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = _fade(gx - ix), _fade(gy - iy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    w00, w10, w01, w11 = (1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy
    total = (
        w00 * normal(ix, iy, seed)
        + w10 * normal(ix + 1, iy, seed)
        + w01 * normal(ix, iy + 1, seed)
        + w11 * normal(ix + 1, iy + 1, seed)
    )
    return total / np.sqrt(w00**2 + w10**2 + w01**2 + w11**2)


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def fractal_noise(
    x: np.ndarray, y: np.ndarray, scales_m: tuple[float, ...], seed: int
) -> np.ndarray:
    """Sum of value noise at several scales, amplitude proportional to scale, unit std overall."""
    weights = np.asarray(scales_m) / max(scales_m)
    total = sum(
        w * value_noise(x, y, s, seed + 7919 * i)
        for i, (s, w) in enumerate(zip(scales_m, weights, strict=True))
    )
    return np.asarray(total) / np.sqrt(np.sum(weights**2))
