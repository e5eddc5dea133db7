"""Surge-type candidates from the dh profile, against hand-made profiles."""

from __future__ import annotations

import numpy as np

from mbcube.massbalance import GlacierStats
from mbcube.surge import effective_surge, reach_rates, surge_candidates

BINS = np.arange(4000.0, 5000.0, 50.0)  # 20 bins


def _stats(rates_m_yr: np.ndarray, measured: np.ndarray | None = None) -> GlacierStats:
    """Glaciers (rows) with uniform area per bin, one surface, 100 measurements per measured bin."""
    n_glaciers, n_bins = rates_m_yr.shape
    count = np.full((n_glaciers, n_bins, 1), 100.0)
    if measured is not None:
        count[~measured] = 0.0
    area = np.full((n_glaciers, n_bins, 1), 1e4)
    return GlacierStats(
        count=count,
        weight=count,
        rate_sum=rates_m_yr[..., None] * count,
        dh_sum=rates_m_yr[..., None] * count * 12.0,
        area_m2=area,
        n_px=area / 900.0,
        measured_px=count.sum(axis=(1, 2)),
        scene_px=count.sum(axis=(1, 2))[None, :],
        scene_weight=np.ones((1, n_glaciers)),
    )


def test_tongue_thickening_under_a_thinning_reservoir_is_a_candidate() -> None:
    z = np.linspace(0.0, 1.0, BINS.size)
    rates = np.stack(
        [
            1.5 - 3.0 * z,  # surge: tongue +1.5, top -1.5
            -2.0 + 2.5 * z,  # ordinary: tongue thins, top thickens a little
            np.full(BINS.size, 0.5),  # uniform thickening: no contrast
            0.4 - 0.6 * z,  # weak surge pattern: contrast below the threshold
        ]
    )
    lower, upper = reach_rates(_stats(rates), BINS, 50.0, 10)
    # lowest third of the area = the first 6.67 bins (bin middles below 1/3)
    np.testing.assert_allclose(lower[0], (1.5 - 3.0 * z[:7]).mean(), atol=1e-12)
    np.testing.assert_allclose(upper[0], (1.5 - 3.0 * z[13:]).mean(), atol=1e-12)
    assert surge_candidates(_stats(rates), BINS).tolist() == [True, False, False, False]


def test_unmeasured_bins_are_filled_before_the_reaches_are_averaged() -> None:
    z = np.linspace(0.0, 1.0, BINS.size)
    rates = (1.5 - 3.0 * z)[None, :]
    measured = np.ones((1, BINS.size, 1), dtype=bool)
    measured[0, :4] = False  # the tongue's lowest bins unmeasured: filled from the nearest bin
    lower, _ = reach_rates(_stats(rates, measured), BINS, 50.0, 10)
    expected = np.r_[np.full(4, rates[0, 4]), rates[0, 4:7]].mean()
    np.testing.assert_allclose(lower[0], expected, atol=1e-12)


def test_outline_surge_column_overrides_the_candidate_flag() -> None:
    outline = np.array([1, 0, -1, -1])
    candidate = np.array([False, True, True, False])
    assert effective_surge(outline, candidate).tolist() == [1, 0, 1, 0]
