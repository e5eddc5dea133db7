"""Bilinear (or quadratic) ramp a + b x + c y + d x y (+ e x^2 + f y^2), x, y in km from the
grid centre, fitted on stable ground by normal equations summed over blocks and a small solve
per scene, robust by sigma clipping of the residuals (iterated)."""

from __future__ import annotations

import numpy as np

#: Names of the ramp terms, in the order of `ramp_coef`'s `coef` dimension.
COEF_NAMES = ("a", "b", "c", "d", "e", "f")
COEF_UNITS = ("m", "m/km", "m/km", "m/km2", "m/km2", "m/km2")
N_COEF = len(COEF_NAMES)


def n_terms(order: int) -> int:
    """Number of terms fitted for ramp order 0 (a), 1 (a b c d) or 2 (all six)."""
    return {0: 1, 1: 4, 2: 6}[order]


def evaluate(coef: np.ndarray, xk: np.ndarray, yk: np.ndarray) -> np.ndarray:
    """The ramp (m) on the block with 1-D pixel coordinates xk (columns), yk (rows), in km."""
    a, b, c, d, e, f = coef
    xk, yk = np.asarray(xk, dtype=np.float64), np.asarray(yk, dtype=np.float64)
    row = (a + c * yk + f * yk * yk)[:, None]  # separable: one multiply-add per pixel
    slope = (b + d * yk)[:, None]
    out = row + slope * xk[None, :]
    if e != 0.0:
        out = out + (e * xk * xk)[None, :]
    return out


#: (power of x, power of y) of each term
_POWERS = ((0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2))


def normal_equations(
    dh_m: np.ndarray,
    use: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre_m: float,
    clip_m: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A^T A (6 x 6) and A^T dh (6) of one block, over the pixels in `use` whose residual
    dh - model lies within centre_m +- clip_m (all six terms; the solve picks the order's).

    The terms are products of powers of x and y, so every sum is a moment sum(w x^p y^q) over
    the selected pixels: a few matrix-vector products per block, no per-pixel design matrix."""
    with np.errstate(invalid="ignore"):
        sel = use & (np.abs(dh_m - evaluate(model, xk, yk) - centre_m) <= clip_m)
    w = sel.astype(np.float64)
    wd = np.where(sel, dh_m, 0.0).astype(np.float64)
    xk, yk = np.asarray(xk, dtype=np.float64), np.asarray(yk, dtype=np.float64)
    powers = xk[:, None] ** np.arange(5)[None, :]  # (columns, 5)
    wx = (w @ powers).T  # (5, rows): sum over columns of w x^p
    dx = (wd @ powers[:, :3]).T
    ata = np.empty((N_COEF, N_COEF))
    atb = np.empty(N_COEF)
    for i, (pi, qi) in enumerate(_POWERS):
        atb[i] = dx[pi] @ yk**qi
        for j, (pj, qj) in enumerate(_POWERS):
            ata[i, j] = wx[pi + pj] @ yk ** (qi + qj)
    return ata, atb


def solve(ata: np.ndarray, atb: np.ndarray, order: int) -> np.ndarray:
    """The six coefficients (zeros for terms above `order`) from summed normal equations."""
    n = n_terms(order)
    coef = np.zeros(N_COEF)
    coef[:n] = np.linalg.lstsq(ata[:n, :n], atb[:n], rcond=None)[0]
    return coef
