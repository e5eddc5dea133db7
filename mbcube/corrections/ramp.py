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


def _terms(xk: np.ndarray, yk: np.ndarray) -> list[np.ndarray]:
    return [np.ones_like(xk), xk, yk, xk * yk, xk * xk, yk * yk]


def evaluate(coef: np.ndarray, xk: np.ndarray, yk: np.ndarray) -> np.ndarray:
    """The ramp (m) on the block with 1-D pixel coordinates xk (columns), yk (rows), in km."""
    X, Y = np.meshgrid(xk, yk)
    return sum(c * t for c, t in zip(coef, _terms(X, Y), strict=True) if c != 0.0) + np.zeros(
        X.shape
    )


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
    dh - model lies within centre_m +- clip_m (all six terms; the solve picks the order's)."""
    X, Y = np.meshgrid(xk, yk)
    resid = dh_m - evaluate(model, xk, yk)
    with np.errstate(invalid="ignore"):
        sel = use & np.isfinite(dh_m) & (np.abs(resid - centre_m) <= clip_m)
    A = np.stack([t[sel] for t in _terms(X, Y)], axis=1)
    return A.T @ A, A.T @ dh_m[sel].astype(np.float64)


def solve(ata: np.ndarray, atb: np.ndarray, order: int) -> np.ndarray:
    """The six coefficients (zeros for terms above `order`) from summed normal equations."""
    n = n_terms(order)
    coef = np.zeros(N_COEF)
    coef[:n] = np.linalg.lstsq(ata[:n, :n], atb[:n], rcond=None)[0]
    return coef
