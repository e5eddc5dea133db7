"""Uncertainty of glacier and region mass balance (1 sigma), term by term, from small tables.

All terms are first elevation-change-rate errors (m/yr), converted with the density to m w.e./yr,
and reported separately; the total is their quadrature sum (the terms are taken as independent).
For a unit (a glacier, or a region = its glaciers' summed statistics) with scene weights w_s
(each scene's share of the unit's mean, see `mbcube.massbalance`) and time spans T_s (yr):

- random: ``sqrt(sum_s (w_s sigma_stable_s / T_s)^2 / N_eff_s)``, sigma_stable_s the standard
  deviation of the scene's corrected dh on stable ground, ``N_eff = N px * pixel size / (2 d)``
  (Bolch et al. 2011), N the pixels scene s measured on the unit, d = `autocorrelation_m` (500 m).
  Scenes are independent; within a scene, errors decorrelate beyond d, so a region's random error
  is computed from its total measured pixels (smaller than its glaciers' errors).
- penetration: two parts, in quadrature, each divided by the span (``* sum_s w_s / T_s``):
  the table error sigma_table (the standard error of each (region, surface, bin) entry of the
  C/X penetration table, `penetration_sigma_m`, area-weighted over the unit; fully correlated over
  bins and over the glaciers of a region, so it does not average down), and, when the table's
  pixel spread std_pen is stored (`penetration_std_m`), how far the unit's own penetration may
  differ from the regional table: ``std_pen / sqrt(N_eff)`` with d = `autocorrelation_penetration_m`
  (2000 m, the decorrelation length of SRTM C minus X) and the unit's measured pixels.
- datum: per scene ``sqrt(mean_stable^2 + sigma_stable^2 / N_eff_stable)`` (the bias left on stable
  ground plus the standard error of the offset estimate). Fully correlated across all glaciers of a
  scene (it does not average out over a region); independent between scenes.
- seasonal: ``seasonal_sigma_m_per_month`` (0.15 m) x months between the scene's month and February;
  fully correlated within a scene, independent between scenes (as the datum term).
- density: ``|dh/dt| * density_sigma / 1000`` (fully correlated everywhere).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "datum_sigma_m",
    "months_from_february",
    "n_eff",
    "quadrature",
    "stable_moments",
    "unit_uncertainty",
]


def months_from_february(month: np.ndarray) -> np.ndarray:
    """Months (0-6) between each month (1-12) and February, either way round the year."""
    m = np.asarray(month, dtype=int)
    return np.abs((m - 2 + 6) % 12 - 6)


def n_eff(n_px: np.ndarray, pixel_size_m: float, autocorrelation_m: float) -> np.ndarray:
    """Effective number of independent measurements, ``n_px * pixel size / (2 d)``, at least 1."""
    n = np.asarray(n_px, dtype=float) * pixel_size_m / (2.0 * autocorrelation_m)
    return np.maximum(n, 1.0)


def stable_moments(
    count: np.ndarray, sum_dh_m: np.ndarray, sumsq_dh_m2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (m) and standard deviation (m) of dh on stable ground per scene (NaN if no pixel)."""
    n = np.asarray(count, dtype=float)
    mean = np.divide(sum_dh_m, n, out=np.full(n.shape, np.nan), where=n > 0)
    var = np.divide(sumsq_dh_m2, n, out=np.full(n.shape, np.nan), where=n > 0) - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def datum_sigma_m(
    stable_count: np.ndarray,
    stable_mean_m: np.ndarray,
    stable_sigma_m: np.ndarray,
    pixel_size_m: float,
    autocorrelation_m: float = 500.0,
) -> np.ndarray:
    """Datum error per scene (m): residual stable-ground bias and the offset's standard error."""
    neff = n_eff(stable_count, pixel_size_m, autocorrelation_m)
    return np.sqrt(stable_mean_m**2 + stable_sigma_m**2 / neff)


def quadrature(*terms: np.ndarray) -> np.ndarray:
    """sqrt of the sum of squares."""
    return np.sqrt(sum(np.asarray(t, dtype=float) ** 2 for t in terms))


def unit_uncertainty(
    dhdt_m_yr: np.ndarray,
    scene_weight: np.ndarray,
    scene_px: np.ndarray,
    measured_px: np.ndarray,
    penetration_sigma_m: np.ndarray,
    scene_years: np.ndarray,
    scene_month: np.ndarray,
    stable_sigma_m: np.ndarray,
    scene_datum_sigma_m: np.ndarray,
    pixel_size_m: float,
    *,
    penetration_std_m: np.ndarray | None = None,
    density_kg_m3: float = 850.0,
    density_sigma_kg_m3: float = 60.0,
    autocorrelation_m: float = 500.0,
    autocorrelation_penetration_m: float = 2000.0,
    seasonal_sigma_m_per_month: float = 0.15,
) -> dict[str, np.ndarray]:
    """The error terms (m w.e./yr, 1 sigma) of U units; keys are the table's column names.

    dhdt_m_yr (U,); scene_weight, scene_px (S, U); measured_px, penetration_sigma_m (table
    error, m), penetration_std_m (spread, m; None: unknown) (U,); scene_years, scene_month,
    stable_sigma_m, scene_datum_sigma_m (S,) per scene.
    Units without a measurement get NaN.
    """
    w = np.asarray(scene_weight, dtype=float)
    years = np.abs(np.asarray(scene_years, dtype=float))[:, None]  # spans (scenes may be older)
    to_mwe = density_kg_m3 / 1000.0
    stable = np.nan_to_num(np.asarray(stable_sigma_m, dtype=float))[:, None]
    datum = np.nan_to_num(np.asarray(scene_datum_sigma_m, dtype=float))[:, None]
    seasonal = seasonal_sigma_m_per_month * months_from_february(scene_month)[:, None]
    neff = n_eff(scene_px, pixel_size_m, autocorrelation_m)
    random = np.sqrt((((w * stable / years) ** 2) / neff).sum(axis=0))
    per_year = (w / years).sum(axis=0)
    spread = np.zeros_like(per_year) if penetration_std_m is None else penetration_std_m
    neff_pen = n_eff(measured_px, pixel_size_m, autocorrelation_penetration_m)
    penetration = (
        quadrature(np.nan_to_num(penetration_sigma_m), np.nan_to_num(spread) / np.sqrt(neff_pen))
        * per_year
    )
    datum_term = np.sqrt(((w * datum / years) ** 2).sum(axis=0))
    seasonal_term = np.sqrt(((w * seasonal / years) ** 2).sum(axis=0))
    measured = np.isfinite(dhdt_m_yr)
    terms = {
        "sigma_random_mwe_yr": random * to_mwe,
        "sigma_penetration_mwe_yr": penetration * to_mwe,
        "sigma_datum_mwe_yr": datum_term * to_mwe,
        "sigma_seasonal_mwe_yr": seasonal_term * to_mwe,
        "sigma_density_mwe_yr": np.abs(dhdt_m_yr) * density_sigma_kg_m3 / 1000.0,
    }
    terms = {k: np.where(measured, v, np.nan) for k, v in terms.items()}
    return {"mb_sigma_mwe_yr": quadrature(*terms.values())} | terms
