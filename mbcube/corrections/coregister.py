"""Horizontal co-registration of DEM-kind scenes on stable ground (Nuth & Kaab 2011, iterated).

Nuth & Kaab fit dh / tan(slope) = a cos(b - aspect) + c; expanded, dh = -(s_e dz/dx + s_n dz/dy)
+ const is linear in the shift (s_e, s_n) (m, east / north) and the terrain gradient, so each
iteration is a 3 x 3 least-squares problem whose normal equations add up over blocks. The scene
is resampled (bilinear) at p + s between iterations, which removes the linearisation error.
Blocks carry a halo of `halo_px` pixels, which bounds the shift that can be applied.
"""

from __future__ import annotations

import numpy as np


def gradient(ref_haloed_m: np.ndarray, res_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Terrain slope dz/dx (east) and dz/dy (north) (m/m), central differences, NaN at the edge."""
    gx = np.full(ref_haloed_m.shape, np.nan, dtype=ref_haloed_m.dtype)
    gy = np.full(ref_haloed_m.shape, np.nan, dtype=ref_haloed_m.dtype)
    gx[:, 1:-1] = (ref_haloed_m[:, 2:] - ref_haloed_m[:, :-2]) / (2.0 * res_m)
    gy[1:-1, :] = (ref_haloed_m[:-2, :] - ref_haloed_m[2:, :]) / (2.0 * res_m)  # rows go south
    return gx, gy


class ShiftTooLarge(ValueError):
    """The shift needs more pixels than the block halo holds."""


def shifted(
    dem_haloed_m: np.ndarray, halo_px: int, shift_m: np.ndarray, res_m: float
) -> np.ndarray:
    """The block's interior sampled (bilinear) at p + shift, shift = (east, north) in m."""
    di, dj = -shift_m[1] / res_m, shift_m[0] / res_m
    i0, j0 = int(np.floor(di)), int(np.floor(dj))
    fi, fj = di - i0, dj - j0
    if max(abs(i0), abs(j0)) + 1 > halo_px:
        raise ShiftTooLarge(
            f"shift {shift_m.tolist()} m exceeds the co-registration halo of {halo_px} px"
        )
    h = halo_px
    ny, nx = dem_haloed_m.shape[0] - 2 * h, dem_haloed_m.shape[1] - 2 * h

    def part(a: int, b: int) -> np.ndarray:
        return dem_haloed_m[h + i0 + a : h + i0 + a + ny, h + j0 + b : h + j0 + b + nx]

    out = (1 - fi) * (1 - fj) * part(0, 0) + (1 - fi) * fj * part(0, 1)
    if fi > 0:
        out = out + fi * (1 - fj) * part(1, 0) + fi * fj * part(1, 1)
    return out


def normal_equations(
    dh_m: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    use: np.ndarray,
    centre_m: float,
    clip_m: float,
    max_slope: float = float(np.tan(np.radians(60.0))),
) -> tuple[np.ndarray, np.ndarray]:
    """A^T A (3 x 3) and A^T dh (3) of one block for dh = p0 gx + p1 gy + p2 over the pixels in
    `use` with dh within centre_m +- clip_m and slope below 60 degrees (one matrix product)."""
    with np.errstate(invalid="ignore"):
        sel = use & (np.abs(dh_m - centre_m) <= clip_m) & (gx * gx + gy * gy <= max_slope**2)
    n = int(sel.sum())
    M = np.empty((3, n))
    M[0], M[1], M[2] = gx[sel], gy[sel], 1.0
    return M @ M.T, M @ dh_m[sel].astype(np.float64)


def shift_update_m(ata: np.ndarray, atb: np.ndarray) -> np.ndarray:
    """The (east, north) shift (m) still left in the scene, from summed normal equations."""
    p = np.linalg.lstsq(ata, atb, rcond=None)[0]
    return -p[:2]
