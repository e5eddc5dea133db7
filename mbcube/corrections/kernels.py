"""Fused per-tile numba kernels of the corrections step: one loop over the tile per pass, no
full-tile temporaries. Each kernel computes what the numpy functions of the sibling modules
compute (`coregister`, `masks`, `ramp`, `robust`, `penetration`, `bins`, `outliers`), with the same
arithmetic in the same dtypes and order (float32 where numpy's promotion rules keep float32,
float64 elsewhere; no fastmath), so the results equal theirs to float rounding of the sums; the
tests compare them.

Passes of the step per tile (DEM scenes; insar scenes skip the co-registration):

- `dem_dh` / `coreg_pass`: the scene resampled at p + shift (bilinear) minus the reference, with
  the validity masks, the finite stable-ground values for the robust seeds and (co-registration)
  the 3 x 3 Nuth & Kaab normal equations;
- `ramp_normal_equations` / `residual_histogram` / `residual_clipped_sum`: the ramp's moments,
  residual histograms and clipped sums over stable ground;
- `corrected_groups`: dh minus datum, ramp, penetration and seasonal offset, each pixel's outlier
  group (a local code into the block's sorted group keys) and the per-group moments;
- `z_codes`, `keep_final`: the per-group z histogram codes and the final masked tile.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from mbcube.corrections.bins import ELEV_MIN_M
from mbcube.corrections.coregister import ShiftTooLarge
from mbcube.corrections.outliers import N_CODES, N_SURFACE, N_Z_BINS, REGION_LIMIT, Z_MAX, Z_WIDTH

#: Steepest terrain (tan 60 degrees) used by the co-registration, as in coregister.normal_equations
MAX_SLOPE = float(np.tan(np.radians(60.0)))
#: Blocks quantiles are taken from at most this many values (robust.block_quantiles)
MAX_SAMPLE = 65536


class Shift(NamedTuple):
    """A shift as integer pixel offsets (i0 rows, j0 columns) and bilinear weights."""

    i0: int
    j0: int
    w00: float
    w01: float
    w10: float
    w11: float
    lower: bool  # the next row contributes (fractional row offset > 0)


def shift_weights(shift_m: np.ndarray, res_m: float, halo_px: int) -> Shift:
    """The bilinear resampling of coregister.shifted for a shift (east, north) in m; raises
    ShiftTooLarge when the halo cannot hold it."""
    shift_m = np.asarray(shift_m, dtype=np.float64)
    di, dj = -shift_m[1] / res_m, shift_m[0] / res_m
    i0, j0 = int(np.floor(di)), int(np.floor(dj))
    fi, fj = di - i0, dj - j0
    if max(abs(i0), abs(j0)) + 1 > halo_px:
        raise ShiftTooLarge(
            f"shift {shift_m.tolist()} m exceeds the co-registration halo of {halo_px} px"
        )
    return Shift(
        i0,
        j0,
        float((1 - fi) * (1 - fj)),
        float((1 - fi) * fj),
        float(fi * (1 - fj)),
        float(fi * fj),
        bool(fi > 0),
    )


# ----------------------------------------------------------------------------- dh of a tile


@numba.njit(nogil=True, cache=True)
def _row_dh(
    dem_h: np.ndarray,
    r0: int,
    c0: int,
    w00: float,
    w01: float,
    w10: float,
    w11: float,
    lower: bool,
    ref_row: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[j] = the haloed scene resampled (bilinear) at row r0, column c0 + j, minus
    ref_row[j] (float64, NaN/inf where an input is not finite). A loop without branches, which
    the compiler vectorizes (the masks are applied after it)."""
    nx = out.size
    a = dem_h[r0, c0 : c0 + nx + 1]
    if lower:
        b = dem_h[r0 + 1, c0 : c0 + nx + 1]
        for j in range(nx):
            v = w00 * np.float64(a[j]) + w01 * np.float64(a[j + 1])
            v = v + w10 * np.float64(b[j]) + w11 * np.float64(b[j + 1])
            out[j] = v - np.float64(ref_row[j])
    else:
        for j in range(nx):
            v = w00 * np.float64(a[j]) + w01 * np.float64(a[j + 1])
            out[j] = v - np.float64(ref_row[j])


@numba.njit(nogil=True, cache=True)
def _dem_values(
    dem_h: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    h: int,
    i0: int,
    j0: int,
    w00: float,
    w01: float,
    w10: float,
    w11: float,
    lower: bool,
) -> tuple[np.ndarray, int]:
    """The finite stable-ground dh only, in raster order."""
    ny, nx = ref.shape
    buf = np.empty(ny * nx, np.float64)
    row = np.empty(nx, np.float64)
    n = 0
    for i in range(ny):
        _row_dh(dem_h, h + i0 + i, h + j0, w00, w01, w10, w11, lower, ref[i], row)
        for j in range(nx):
            # (a finite dh implies a finite reference)
            if stable[i, j] == 1 and void[i, j] == 0 and np.isfinite(row[j]):
                buf[n] = row[j]
                n += 1
    return buf, n


@numba.njit(nogil=True, cache=True)
def _dem_dh(
    dem_h: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    h: int,
    i0: int,
    j0: int,
    w00: float,
    w01: float,
    w10: float,
    w11: float,
    lower: bool,
) -> np.ndarray:
    ny, nx = ref.shape
    dh = np.empty((ny, nx), np.float64)
    for i in range(ny):
        out = dh[i]
        _row_dh(dem_h, h + i0 + i, h + j0, w00, w01, w10, w11, lower, ref[i], out)
        for j in range(nx):
            # a finite dh implies a finite reference; `&` keeps the loop free of branches
            out[j] = out[j] if np.isfinite(out[j]) & (void[i, j] == 0) else np.nan
    return dh


@numba.njit(nogil=True, cache=True)
def _stable_values(dh: np.ndarray, stable: np.ndarray) -> np.ndarray:
    """The finite dh on stable ground, in raster order (a separate loop: fused into the loop
    that makes dh, the gather slows that loop down severalfold)."""
    ny, nx = dh.shape
    n = 0
    for i in range(ny):
        for j in range(nx):
            if stable[i, j] == 1 and np.isfinite(dh[i, j]):
                n += 1
    out = np.empty(n, np.float64)
    n = 0
    for i in range(ny):
        for j in range(nx):
            d = dh[i, j]
            if stable[i, j] == 1 and np.isfinite(d):
                out[n] = d
                n += 1
    return out


def dem_dh(
    dem_h: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    halo_px: int,
    shift: Shift,
    keep_dh: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(dh float64 (m, NaN where invalid; empty when not keep_dh), the finite stable-ground dh in
    raster order) of a DEM tile resampled at p + shift: coregister.shifted minus the reference,
    masked by masks.validity."""
    if not keep_dh:
        buf, n = _dem_values(dem_h, ref, void, stable, halo_px, *shift)
        return np.empty((0, 0)), buf[:n]
    dh = _dem_dh(dem_h, ref, void, halo_px, *shift)
    return dh, _stable_values(dh, stable)


@numba.njit(nogil=True, cache=True)
def _insar_dh(
    raw: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    radar: np.ndarray,
    coh: np.ndarray,
    coh_min: np.float32,
) -> np.ndarray:
    ny, nx = raw.shape
    dh = np.empty((ny, nx), np.float32)
    nan = np.float32(np.nan)
    for i in range(ny):
        for j in range(nx):
            d = np.float32(raw[i, j])
            z = ref[i, j]
            ok = np.isfinite(d) and np.isfinite(z) and void[i, j] == 0 and radar[i, j] == 0
            dh[i, j] = d if ok and coh[i, j] >= coh_min else nan
    return dh


def insar_dh(
    raw: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    radar: np.ndarray,
    coh: np.ndarray,
    stable: np.ndarray,
    coherence_min: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(dh float32 (m, NaN where invalid), the finite stable-ground dh in raster order) of an
    insar tile: dh_raw_m masked by masks.validity (coherence >= coherence_min)."""
    dh = _insar_dh(raw, ref, void, radar, coh, np.float32(coherence_min))
    return dh, _stable_values(dh, stable)


def quantile_row(values: np.ndarray) -> np.ndarray:
    """robust.block_quantiles of finite values already gathered in raster order."""
    if values.size == 0:
        return np.array([0.0, np.nan, np.nan, np.nan])
    step = max(1, values.size // MAX_SAMPLE)
    q = np.percentile(values[::step], [25.0, 50.0, 75.0])
    return np.array([float(values.size), *q])


@numba.njit(nogil=True, cache=True)
def _coreg(
    dem_h: np.ndarray,
    ref_h: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    h: int,
    i0: int,
    j0: int,
    w00: float,
    w01: float,
    w10: float,
    w11: float,
    lower: bool,
    two_res: np.float32,
    slope2: np.float32,
    centre: float,
    clip: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    ny, nx = void.shape
    ata = np.zeros((3, 3))
    atb = np.zeros(3)
    buf = np.empty(ny * nx, np.float64)
    row = np.empty(nx, np.float64)
    n = 0
    sxx = sxy = sx = syy = sy = s1 = 0.0
    bx = by = b1 = 0.0
    for i in range(ny):
        _row_dh(dem_h, h + i0 + i, h + j0, w00, w01, w10, w11, lower, ref_h[h + i, h:], row)
        for j in range(nx):
            d = row[j]
            # (a finite dh implies a finite reference)
            if not (np.isfinite(d) and void[i, j] == 0):
                continue
            if stable[i, j] != 1:
                continue
            buf[n] = d
            n += 1
            if not abs(d - centre) <= clip:
                continue
            gx = (ref_h[h + i, h + j + 1] - ref_h[h + i, h + j - 1]) / two_res
            gy = (ref_h[h + i - 1, h + j] - ref_h[h + i + 1, h + j]) / two_res
            if not gx * gx + gy * gy <= slope2:
                continue
            x, y = np.float64(gx), np.float64(gy)
            sxx += x * x
            sxy += x * y
            sx += x
            syy += y * y
            sy += y
            s1 += 1.0
            bx += x * d
            by += y * d
            b1 += d
    ata[0, 0], ata[0, 1], ata[0, 2] = sxx, sxy, sx
    ata[1, 0], ata[1, 1], ata[1, 2] = sxy, syy, sy
    ata[2, 0], ata[2, 1], ata[2, 2] = sx, sy, s1
    atb[0], atb[1], atb[2] = bx, by, b1
    return ata, atb, buf, n


def coreg_pass(
    dem_h: np.ndarray,
    ref_h: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    halo_px: int,
    shift: Shift,
    res_m: float,
    centre_m: float,
    clip_m: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One co-registration pass over a tile: coregister.normal_equations of the dh at p + shift
    (stable ground, |dh - centre| <= clip, slope below 60 degrees; gradients of the haloed
    reference as coregister.gradient) and the finite stable-ground dh in raster order.
    Returns (A^T A (3 x 3), A^T dh (3), values)."""
    ata, atb, buf, n = _coreg(
        dem_h,
        ref_h,
        void,
        stable,
        halo_px,
        *shift,
        np.float32(2.0 * res_m),
        np.float32(MAX_SLOPE**2),
        float(centre_m),
        float(clip_m),
    )
    return ata, atb, buf[:n]


# ------------------------------------------------------------------------------- the ramp


@numba.njit(nogil=True, cache=True)
def _ramp_rows(model: np.ndarray, yk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d, f = model[0], model[1], model[2], model[3], model[5]
    row = np.empty(yk.size)
    slope = np.empty(yk.size)
    for i in range(yk.size):
        y = yk[i]
        row[i] = a + c * y + f * y * y
        slope[i] = b + d * y
    return row, slope


@numba.njit(nogil=True, cache=True)
def _ramp_at(row: float, slope: float, e: float, x: float) -> float:
    """The ramp (m) at x (km) on a row, given that row's `_ramp_rows` terms and the x^2
    coefficient e (the order-2 ramp; 0 for the bilinear one)."""
    m = row + slope * x
    if e != 0.0:
        m = m + e * x * x
    return m


@numba.njit(nogil=True, cache=True)
def _ramp_ne(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre: float,
    clip: float,
) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = dh.shape
    row, slope = _ramp_rows(model, yk)
    e = model[4]
    # moment sums sum(w x^p y^q): per row over columns, then times y^q
    wxy = np.zeros((5, 5))  # [p, q] for p + q <= 4
    dxy = np.zeros((3, 3))  # sum(dh x^p y^q), p + q <= 2
    sx = np.zeros(5)
    sd = np.zeros(3)
    for i in range(ny):
        s0 = s1 = s2 = s3 = s4 = 0.0
        d0 = d1 = d2 = 0.0
        ri, si = row[i], slope[i]
        for j in range(nx):
            if stable[i, j] != 1:
                continue
            v = np.float64(dh[i, j])
            x = xk[j]
            m = _ramp_at(ri, si, e, x)
            if not abs(v - m - centre) <= clip:
                continue
            x2 = x * x
            s0 += 1.0
            s1 += x
            s2 += x2
            s3 += x2 * x
            s4 += x2 * x2
            d0 += v
            d1 += v * x
            d2 += v * x2
        sx[0], sx[1], sx[2], sx[3], sx[4] = s0, s1, s2, s3, s4
        sd[0], sd[1], sd[2] = d0, d1, d2
        y = yk[i]
        yq = 1.0
        for q in range(5):
            for p in range(5 - q):
                wxy[p, q] += sx[p] * yq
            if q < 3:
                for p in range(3 - q):
                    dxy[p, q] += sd[p] * yq
            yq *= y
    px = (0, 1, 0, 1, 2, 0)
    py = (0, 0, 1, 1, 0, 2)
    ata = np.empty((6, 6))
    atb = np.empty(6)
    for a in range(6):
        atb[a] = dxy[px[a], py[a]]
        for b in range(6):
            ata[a, b] = wxy[px[a] + px[b], py[a] + py[b]]
    return ata, atb


def ramp_normal_equations(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre_m: float,
    clip_m: float,
) -> tuple[np.ndarray, np.ndarray]:
    """ramp.normal_equations over the stable pixels (stable == 1) in one loop: A^T A (6 x 6) and
    A^T dh (6) of the pixels whose residual dh - model lies within centre_m +- clip_m."""
    return _ramp_ne(
        dh,
        stable,
        np.asarray(xk, dtype=np.float64),
        np.asarray(yk, dtype=np.float64),
        np.asarray(model, dtype=np.float64),
        float(centre_m),
        float(clip_m),
    )


@numba.njit(nogil=True, cache=True)
def _resid_hist(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    lo: float,
    width: float,
    nbins: int,
) -> np.ndarray:
    ny, nx = dh.shape
    row, slope = _ramp_rows(model, yk)
    e = model[4]
    # slot 0 collects what is not counted (off stable ground, residual not finite); slot k + 2
    # the residuals of bin k = -1 (underflow) .. nbins (overflow). The slots of a row are made
    # in a loop without branches (vectorized), then counted.
    counts = np.zeros(nbins + 3, np.int64)
    slots = np.empty(nx, np.int64)
    top = np.float64(nbins)
    for i in range(ny):
        ri, si = row[i], slope[i]
        for j in range(nx):
            r = np.float64(dh[i, j]) - _ramp_at(ri, si, e, xk[j])
            k = min(max(np.floor((r - lo) / width), -1.0), top)
            ok = np.isfinite(r) & (stable[i, j] == 1)
            slots[j] = np.int64(k) + 2 if ok else 0
        for j in range(nx):
            counts[slots[j]] += 1
    return counts[1:]


def residual_histogram(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    lo_m: float,
    width_m: float,
    n_bins: int,
) -> np.ndarray:
    """robust.histogram of the stable-ground residuals dh - ramp.evaluate(model), in one loop."""
    return _resid_hist(
        dh,
        stable,
        np.asarray(xk, dtype=np.float64),
        np.asarray(yk, dtype=np.float64),
        np.asarray(model, dtype=np.float64),
        float(lo_m),
        float(width_m),
        int(n_bins),
    )


@numba.njit(nogil=True, cache=True)
def _resid_clipped(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre: float,
    half: float,
) -> np.ndarray:
    ny, nx = dh.shape
    row, slope = _ramp_rows(model, yk)
    e = model[4]
    out = np.zeros(2)
    for i in range(ny):
        for j in range(nx):
            if stable[i, j] != 1:
                continue
            x = xk[j]
            m = _ramp_at(row[i], slope[i], e, x)
            r = np.float64(dh[i, j]) - m
            if np.isfinite(r) and abs(r - centre) <= half:
                out[0] += 1.0
                out[1] += r
    return out


def residual_clipped_sum(
    dh: np.ndarray,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre_m: float,
    half_width_m: float,
) -> np.ndarray:
    """robust.clipped_sum of the stable-ground residuals dh - ramp.evaluate(model)."""
    return _resid_clipped(
        dh,
        stable,
        np.asarray(xk, dtype=np.float64),
        np.asarray(yk, dtype=np.float64),
        np.asarray(model, dtype=np.float64),
        float(centre_m),
        float(half_width_m),
    )


# --------------------------------------------------------------- corrected tile and outliers


class CorrectedTile(NamedTuple):
    """The corrected tile (float32, m), each pixel's index into the block's sorted group keys
    (int32, -1: no group or dh not finite), and per key the count, sum (m) and sum of squares
    (m2) of dh (outliers.Moments' fields)."""

    dh_m: np.ndarray
    codes: np.ndarray
    keys: np.ndarray
    n: np.ndarray
    s: np.ndarray
    ss: np.ndarray


@numba.njit(nogil=True, cache=True)
def _corrected(
    dh: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    tilt: np.ndarray,
    datum: np.ndarray,
    pen: np.ndarray,
    pen_lo: float,
    pen_width: float,
    seasonal: float,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    glacier: np.ndarray,
    width: np.float32,
    bins: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ny, nx = dh.shape
    datum_t = datum[0]  # in dh's dtype: numpy subtracts a Python float in dh's dtype
    row, slope = _ramp_rows(tilt, yk)
    e = tilt[4]
    n_reg, n_bin_pen = pen.shape[0], pen.shape[2]
    elev_min = np.float32(ELEV_MIN_M)
    # the labels and bins present: region ids off glaciers, glacier ids on glaciers, each given
    # a local row of a dense (row, surface, bin) -> code table
    gmin, gmax = np.int64(np.iinfo(np.int64).max), np.int64(np.iinfo(np.int64).min)
    zlo, zhi = np.inf, -np.inf
    ilo = jlo = ihi = jhi = -1
    has_region = np.zeros(REGION_LIMIT, np.bool_)
    for i in range(ny):
        for j in range(nx):
            g, s = np.int64(glacier[i, j]), np.int64(surface[i, j])
            if g > 0 and s > 0:
                if g < gmin:
                    gmin = g
                if g > gmax:
                    gmax = g
            else:
                r = np.int64(region[i, j])
                if 0 <= r < REGION_LIMIT:
                    has_region[r] = True
            z = np.float64(ref[i, j])
            if z < zlo:
                zlo, ilo, jlo = z, i, j
            if z > zhi:
                zhi, ihi, jhi = z, i, j
    # bins are monotonic in the elevation: the extreme pixels give the bin range
    bmin, bmax = bins, -1
    if ilo >= 0:
        bmin = int(min(max(np.floor((ref[ilo, jlo] - elev_min) / width), 0.0), bins - 1.0))
        bmax = int(min(max(np.floor((ref[ihi, jhi] - elev_min) / width), 0.0), bins - 1.0))
    reg_row = np.full(REGION_LIMIT, -1, np.int64)
    n_rows = 0
    for rg in range(REGION_LIMIT):
        if has_region[rg]:
            reg_row[rg] = n_rows
            n_rows += 1
    glac_row = np.full(gmax - gmin + 1 if gmax >= gmin else 0, -1, np.int64)
    if glac_row.size:
        for i in range(ny):
            for j in range(nx):
                g, s = np.int64(glacier[i, j]), np.int64(surface[i, j])
                if g > 0 and s > 0:
                    glac_row[g - gmin] = 0
        for k in range(glac_row.size):
            if glac_row[k] == 0:
                glac_row[k] = n_rows
                n_rows += 1
    b0, nb = (bmin, bmax - bmin + 1) if bmax >= bmin else (0, 1)
    dense = np.full(n_rows * N_SURFACE * nb, -1, np.int32)
    corr = np.empty((ny, nx), np.float32)
    codes = np.empty((ny, nx), np.int32)
    cap = min(dense.size, ny * nx)  # at most one group per dense slot and per pixel
    keys = np.empty(cap, np.int64)
    cn = np.zeros(cap, np.int64)
    cs = np.zeros(cap, np.float64)
    css = np.zeros(cap, np.float64)
    m = 0
    for i in range(ny):
        for j in range(nx):
            x = xk[j]
            t = _ramp_at(row[i], slope[i], e, x)
            v = np.float64(dh[i, j] - datum_t) - t
            s = np.int64(surface[i, j])
            z = ref[i, j]
            if s > 0:
                p = np.floor((np.float64(z) - pen_lo) / pen_width)
                if np.isnan(p):
                    p = 0.0
                p = min(max(p, 0.0), n_bin_pen - 1.0)
                rr = int(region[i, j])
                rr = 0 if rr < 0 else (n_reg - 1 if rr > n_reg - 1 else rr)
                ss = 0 if s < 2 else 1
                v = v - (pen[rr, ss, int(p)] + seasonal)
            c32 = np.float32(v)
            corr[i, j] = c32
            codes[i, j] = -1
            if not np.isfinite(c32) or not np.isfinite(z):
                continue
            bf = np.floor((z - elev_min) / width)
            b = int(min(max(bf, -1.0), bins - 1.0))
            if b < 0 or s < 0 or s >= N_SURFACE:
                continue
            g = np.int64(glacier[i, j])
            if g > 0 and s > 0:
                lrow = glac_row[g - gmin]
                key = ((g + (REGION_LIMIT - 1)) * N_SURFACE + s) * bins + b
            else:
                r = np.int64(region[i, j])
                if r < 0 or r >= REGION_LIMIT:
                    continue
                lrow = reg_row[r]
                key = (r * N_SURFACE + s) * bins + b
            slot = (lrow * N_SURFACE + s) * nb + (b - b0)
            code = dense[slot]
            if code < 0:
                code = m
                dense[slot] = np.int32(code)
                keys[code] = key
                m += 1
            codes[i, j] = code
            w = np.float64(c32)
            cn[code] += 1
            cs[code] += w
            css[code] += w * w
    order = np.argsort(keys[:m], kind="mergesort")
    rank = np.empty(m, np.int32)
    for k in range(m):
        rank[order[k]] = k
    for i in range(ny):
        for j in range(nx):
            c = codes[i, j]
            if c >= 0:
                codes[i, j] = rank[c]
    return corr, codes, keys[:m][order], cn[:m][order], cs[:m][order], css[:m][order]


def corrected_groups(
    dh: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    tilt: np.ndarray,
    datum_m: float,
    pen_m: np.ndarray,
    pen_lo_m: float,
    pen_width_m: float,
    seasonal_m: float,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    glacier: np.ndarray,
    width_m: float,
    bins: int,
) -> CorrectedTile:
    """dh - datum - ramp(tilt), minus penetration (penetration.lookup of the table `pen_m` with
    lower bin edge pen_lo_m) and the seasonal offset on glacier pixels, as float32; each
    pixel's outlier group (outliers.group_keys, outliers.block_groups) and the groups' moments
    (outliers.moments_block), in one loop over the tile plus one over its labels."""
    corr, codes, keys, n, s, ss = _corrected(
        dh,
        np.asarray(xk, dtype=np.float64),
        np.asarray(yk, dtype=np.float64),
        np.asarray(tilt, dtype=np.float64),
        np.array([datum_m], dtype=dh.dtype),
        np.ascontiguousarray(pen_m, dtype=np.float64),
        float(pen_lo_m),
        float(pen_width_m),
        float(seasonal_m),
        region,
        surface,
        ref,
        glacier,
        np.float32(width_m),
        int(bins),
    )
    return CorrectedTile(corr, codes, keys, n, s, ss)


@numba.njit(nogil=True, cache=True)
def _z_slot(value: float, mean: float, sd: float) -> int:
    """Slot 0..N_Z_BINS + 1 of a pixel's z = (value - mean) / sd: its z bin + 1, clipped (the
    two outer slots hold everything beyond -+Z_MAX)."""
    zb = np.floor(((np.float64(value) - mean) / sd + Z_MAX) / Z_WIDTH)
    if zb < -1.0:
        zb = -1.0
    elif zb > N_Z_BINS:
        zb = N_Z_BINS
    return int(zb) + 1


@numba.njit(nogil=True, cache=True)
def _z_codes(
    corr: np.ndarray, codes: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, int]:
    ny, nx = corr.shape
    out = np.empty(ny * nx, np.int64)
    n = 0
    for i in range(ny):
        for j in range(nx):
            c = codes[i, j]
            if c < 0:
                continue
            sd = std[c]
            if not np.isfinite(sd):
                continue
            out[n] = np.int64(c) * N_CODES + _z_slot(corr[i, j], mean[c], sd)
            n += 1
    return out, n


def z_codes(corr: np.ndarray, codes: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """local code * N_CODES + z bin of each grouped pixel (outliers.zhist_block before its
    counting), given the mean and std (m) of each local code (NaN std: left out)."""
    out, n = _z_codes(corr, codes, mean, std)
    return out[:n]


@numba.njit(nogil=True, cache=True)
def _z_counts(corr: np.ndarray, codes: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    ny, nx = corr.shape
    counts = np.zeros(mean.size * N_CODES, np.int64)
    for i in range(ny):
        for j in range(nx):
            c = codes[i, j]
            if c < 0:
                continue
            sd = std[c]
            if not np.isfinite(sd):
                continue
            counts[np.int64(c) * N_CODES + _z_slot(corr[i, j], mean[c], sd)] += 1
    return counts


def z_histogram(
    corr: np.ndarray, codes: np.ndarray, keys: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """outliers.zhist_block in one loop: (key * N_CODES + z bin, count) of the non-empty z bins
    of each group, sorted; `mean`, `std` (m) per local code (NaN std: left out). Counts into a
    dense (groups x N_CODES) table when it is not much larger than the tile, else sorts the
    pixels' codes."""
    if keys.size * N_CODES <= 4 * corr.size:
        counts = _z_counts(corr, codes, mean, std)
        nz = np.flatnonzero(counts)
        counts = counts[nz]
    else:
        nz, counts = np.unique(z_codes(corr, codes, mean, std), return_counts=True)
    return keys[nz // N_CODES] * N_CODES + nz % N_CODES, counts.astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _keep_final(
    corr: np.ndarray, codes: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ny, nx = corr.shape
    out = np.empty((ny, nx), np.float32)
    ok = np.zeros((ny, nx), np.uint8)
    rejected = np.zeros(lower.size, np.int64)
    nan = np.float32(np.nan)
    for i in range(ny):
        for j in range(nx):
            v = corr[i, j]
            c = codes[i, j]
            keep = np.isfinite(v)
            if keep and c >= 0:
                w = np.float64(v)
                if w < lower[c] or w > upper[c]:
                    keep = False
                    rejected[c] += 1
            if keep:
                out[i, j] = v
                ok[i, j] = 1
            else:
                out[i, j] = nan
    return out, ok, rejected


def keep_final(
    corr: np.ndarray, codes: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dh float32 with NaN where rejected or invalid, valid uint8, rejected pixels per local
    code): outliers.keep and outliers.rejected_block with the thresholds of each local code."""
    return _keep_final(corr, codes, lower, upper)


# ------------------------------------------------------------------ penetration (static)


@numba.njit(nogil=True, cache=True)
def _xc_diff(c: np.ndarray, x: np.ndarray, void: np.ndarray) -> np.ndarray:
    ny, nx = c.shape
    out = np.empty((ny, nx), np.float64)
    for i in range(ny):
        for j in range(nx):
            d = np.float64(x[i, j]) - np.float64(c[i, j])
            out[i, j] = d if void[i, j] == 0 else np.nan
    return out


def xc_difference(ref_c: np.ndarray, ref_x: np.ndarray, void: np.ndarray) -> np.ndarray:
    """ref_dem_x_m - ref_dem_m (m, float64), NaN on reference voids."""
    return _xc_diff(ref_c, ref_x, void)


def stable_values(dh: np.ndarray, stable: np.ndarray) -> np.ndarray:
    """The finite values of `dh` on stable ground (stable == 1), in raster order."""
    return _stable_values(dh, stable)


@numba.njit(nogil=True, cache=True)
def _pen_sums(
    diff: np.ndarray,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    n_region: int,
    width: np.float32,
    bins: int,
) -> np.ndarray:
    ny, nx = diff.shape
    out = np.zeros((3, n_region + 1, 2, bins))
    elev_min = np.float32(ELEV_MIN_M)
    for i in range(ny):
        for j in range(nx):
            d = diff[i, j]
            s = np.int64(surface[i, j])
            z = ref[i, j]
            if not np.isfinite(d) or s < 1 or s > 2 or not np.isfinite(z):
                continue
            b = int(min(max(np.floor((z - elev_min) / width), -1.0), bins - 1.0))
            if b < 0:
                continue
            v = np.float64(d)
            out[0, 0, s - 1, b] += 1.0
            out[1, 0, s - 1, b] += v
            out[2, 0, s - 1, b] += v * v
            r = np.int64(region[i, j])
            if 0 < r <= n_region:
                out[0, r, s - 1, b] += 1.0
                out[1, r, s - 1, b] += v
                out[2, r, s - 1, b] += v * v
    return out


def penetration_sums(
    diff_m: np.ndarray,
    region_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    n_region: int,
    width_m: float,
    bins: int,
) -> np.ndarray:
    """penetration.sums_block in one loop: (3, n_region + 1, 2, bins) count, sum and sum of
    squares of diff_m on the glacier pixels per (region, surface, bin); region 0 pools all."""
    return _pen_sums(
        diff_m, region_id, surface, ref_dem_m, int(n_region), np.float32(width_m), int(bins)
    )
