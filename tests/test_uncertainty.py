"""The white / correlated split of the stable-ground error (`mbcube.uncertainty`), from pixels
through the binning kernel's block statistic, and the random and datum terms that use it,
against a unit-by-unit oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbcube.binning import bin_axis, nmad_from_histogram, stats_tile
from mbcube.synth.noise import normal, value_noise
from mbcube.uncertainty import (
    SPLIT_MIN_BLOCKS,
    adjusted_units,
    datum_sigma_m,
    random_sigma_m_yr,
    spatial_variance_ratio,
    spherical_correlation,
    unit_uncertainty,
    white_correlated_split,
)

RES_M = 30.0
RANGE_M = 500.0
BLOCK_PX = 17  # round(500 / 30)


def rho_by_hand(area_m2: float, a_m: float) -> float:
    """Rolstad et al. (2009): variance ratio of the mean over a disc of area A."""
    r = np.sqrt(area_m2 / np.pi) / a_m
    return 1 - r + r**3 / 5 if r <= 1 else 1 / (5 * r**2)


def split_of_field(dh: np.ndarray) -> tuple[float, float, float]:
    """(pixel NMAD, white, correlated) of a stable-ground dh field (m), 256 px tiles, through
    the binning kernel's blocks and `white_correlated_split`."""
    tile = 256
    axis = bin_axis(0.0, 1.0)
    totals = None
    for r in range(0, dh.shape[0], tile):
        for c in range(0, dh.shape[1], tile):
            block = dh[r : r + tile, c : c + tile].astype(np.float32)
            ones = np.ones(block.shape, np.uint8)
            part = stats_tile(
                np.zeros(block.shape, np.int32),
                np.zeros(block.shape, np.int8),
                np.zeros(block.shape, np.float32),
                block,
                ones,
                axis,
                1,
                BLOCK_PX,
            )
            totals = (
                part.totals
                if totals is None
                else tuple(a + b for a, b in zip(totals, part.totals, strict=True))
            )
    assert totals is not None
    _, _, hist, blk_n, blk_sums, blk_hist = totals
    sigma = nmad_from_histogram(hist)[1]
    n = blk_n[0]
    white, corr = white_correlated_split(
        np.array([sigma]),
        np.array([nmad_from_histogram(blk_hist)[1]]),
        np.array([n]),
        np.array([blk_sums[3] / n]),
        np.array([blk_sums[2] / n]),
        RES_M,
        RANGE_M,
    )
    return sigma, float(white[0]), float(corr[0])


def grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    iy, ix = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return ix * RES_M + 500000.0, 4000000.0 - iy * RES_M, ix, iy


def test_white_noise_is_found_white() -> None:
    """2 m of white noise: (almost) no correlated part, so it averages as 1 / n."""
    _, _, ix, iy = grid(768)
    sigma, white, corr = split_of_field(2.0 * normal(ix, iy, 5))
    assert sigma == pytest.approx(2.0, rel=0.02)
    assert white == pytest.approx(2.0, rel=0.03)
    assert corr < 0.25  # of 2 m: the block spread's sampling error


@pytest.mark.parametrize(("white_m", "corr_m", "white_low"), [(1.6, 0.9, 0.9), (0.8, 1.2, 0.5)])
def test_white_and_correlated_parts_are_recovered(
    white_m: float, corr_m: float, white_low: float
) -> None:
    """The generator's InSAR-like (1.6 m white + the reference's 0.9 m correlated over ~500 m)
    and DEM-like mixes. The generator's correlated field (value noise of 500 m scale) keeps more
    of its variance in a 510 m block (0.59) than a spherical variogram of 500 m range (0.46), so
    its part is read up to ~12 % high (1.26 x its variance) and the white part low by that
    variance: within 10 % when white dominates (InSAR), 0.47 m for 0.8 m when it does not (DEM).
    Either way on the safe side: what is not read as white is counted as correlated."""
    x, y, ix, iy = grid(1024)
    dh = white_m * normal(ix, iy, 7) + corr_m * value_noise(x, y, RANGE_M, 11)
    sigma, white, corr = split_of_field(dh)
    assert sigma**2 == pytest.approx(white**2 + corr**2, rel=1e-9)
    assert white_low * white_m < white < 1.05 * white_m
    assert corr_m * 0.95 < corr < corr_m * 1.15


def test_split_inverts_the_block_model_exactly() -> None:
    """V_B = sigma_k^2 rho(A_B) + sigma_w^2 h gives back sigma_k and sigma_w; too few blocks, a
    missing statistic, or blocks of one pixel leave everything correlated."""
    sigma_w, sigma_k, n_b = np.array([1.7, 0.3, 0.0]), np.array([0.9, 1.4, 1.0]), 250.0
    rho_b = rho_by_hand(n_b * RES_M**2, RANGE_M)
    vb = sigma_k**2 * rho_b + sigma_w**2 / n_b
    sigma = np.sqrt(sigma_w**2 + sigma_k**2)
    white, corr = white_correlated_split(
        sigma, np.sqrt(vb), np.full(3, 300), np.full(3, n_b), np.full(3, 1 / n_b), RES_M
    )
    np.testing.assert_allclose(white, sigma_w, atol=1e-7)
    np.testing.assert_allclose(corr, sigma_k, rtol=1e-9)
    few = white_correlated_split(
        sigma,
        np.sqrt(vb),
        np.array([SPLIT_MIN_BLOCKS - 1, 300, 300]),
        np.array([n_b, n_b, 1.0]),
        np.array([1 / n_b, np.nan, 1.0]),
        RES_M,
    )
    np.testing.assert_array_equal(few[0], 0.0)
    np.testing.assert_allclose(few[1], sigma)
    # a block spread above the pixels' (no white part) or below pure white noise is clipped
    white, corr = white_correlated_split(
        np.array([1.0, 1.0]),
        np.array([5.0, 0.0]),
        np.full(2, 300),
        np.full(2, n_b),
        np.full(2, 1 / n_b),
        RES_M,
    )
    np.testing.assert_allclose(white, [0.0, 1.0])
    np.testing.assert_allclose(corr, [1.0, 0.0])


def random_scene_case(
    rng: np.random.Generator, n_scenes: int, n_units: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w, px, measured, years, sigma): scene weights (S, U) summing to 1 per unit where any,
    measured pixels per scene and unit, per unit, spans (yr, either sign), stable spreads (m)."""
    w = rng.random((n_scenes, n_units)) * (rng.random((n_scenes, n_units)) < 0.7)
    w = np.divide(w, w.sum(axis=0), out=np.zeros_like(w), where=w.sum(axis=0) > 0)
    px = np.where(w > 0, rng.integers(1, 50_000, w.shape), 0).astype(float)
    measured = px.max(axis=0) * rng.uniform(1.0, 1.5, n_units)
    years = rng.choice([-1, 1], n_scenes) * rng.uniform(3, 20, n_scenes)
    sigma = rng.uniform(0.2, 5.0, n_scenes)
    return w, px, measured, years, sigma


def oracle_random(
    w: np.ndarray,
    px: np.ndarray,
    measured: np.ndarray,
    years: np.ndarray,
    sigma: np.ndarray,
    white: np.ndarray,
    reference: float | None,
) -> np.ndarray:
    """Unit by unit, scene by scene (30 m pixels, a = 500 m): the correlated part common to the
    scenes (the smallest, or the reference bound), the rest per scene, white as 1 / n."""
    out = np.zeros(w.shape[1])
    for u in range(w.shape[1]):
        used = [s for s in range(w.shape[0]) if w[s, u] > 0]
        if not used:
            continue
        corr = {s: np.sqrt(sigma[s] ** 2 - white[s] ** 2) for s in used}
        common = min(corr.values())
        if reference is not None:
            common = min(common, reference)
        per_year = sum(w[s, u] / abs(years[s]) for s in used)
        var = common**2 * rho_by_hand(measured[u] * 900.0, 500.0) * per_year**2
        for s in used:
            own = corr[s] ** 2 - common**2
            var += (w[s, u] / abs(years[s])) ** 2 * (
                own * rho_by_hand(px[s, u] * 900.0, 500.0) + white[s] ** 2 / px[s, u]
            )
        out[u] = np.sqrt(var)
    return out


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_scenes=st.integers(1, 5),
    n_units=st.integers(1, 6),
    reference=st.one_of(st.none(), st.floats(0.1, 3.0)),
)
def test_random_term_with_white_part_matches_oracle(
    seed: int, n_scenes: int, n_units: int, reference: float | None
) -> None:
    rng = np.random.default_rng(seed)
    w, px, measured, years, sigma = random_scene_case(rng, n_scenes, n_units)
    white = sigma * rng.uniform(0.0, 1.0, n_scenes)
    got = random_sigma_m_yr(w, px, measured, years, sigma, 30.0, 500.0, reference, white)
    want = oracle_random(w, px, measured, years, sigma, white, reference)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # no white part: the former model. (A white part need not lower the term: a scene with
    # less correlated error lowers the part common to the scenes, which averaged over the whole
    # unit, and the other scenes' own parts, averaged over their smaller areas, grow.)
    plain = random_sigma_m_yr(w, px, measured, years, sigma, 30.0, 500.0, reference)
    zero = np.zeros(n_scenes)
    np.testing.assert_allclose(
        plain, oracle_random(w, px, measured, years, sigma, zero, reference), rtol=1e-10
    )
    # one scene over the unit: white noise averages at least as well as correlated error
    one = (w[:1] > 0).astype(float)
    args = (px[:1], px[0], years[:1], sigma[:1], 30.0, 500.0, reference)
    assert np.all(
        random_sigma_m_yr(one, *args, white[:1]) <= random_sigma_m_yr(one, *args) * (1 + 1e-12)
    )


def test_insar_like_white_noise_averages_over_a_glacier() -> None:
    """A 1 km2 glacier seen by 4 scenes of 2 m stable spread, 1.8 m of it white: the random
    term is that of the 0.87 m correlated part (common to the scenes) plus the white noise over
    the glacier's pixels, about half the all-correlated value."""
    n = 1111  # 1 km2 of 30 m pixels
    w, px = np.full((4, 1), 0.25), np.full((4, 1), float(n))
    sigma, white = np.full(4, 2.0), np.full(4, 1.8)
    got = random_sigma_m_yr(w, px, np.array([float(n)]), np.full(4, 12.0), sigma, 30.0, 500.0,
                            None, white)[0]  # fmt: skip
    corr2 = 4.0 - 1.8**2
    rho = rho_by_hand(n * 900.0, 500.0)
    want = np.sqrt(corr2 * rho / 144.0 + 4 * (0.25 / 12) ** 2 * 1.8**2 / n)
    assert got == pytest.approx(want, rel=1e-12)
    every = random_sigma_m_yr(w, px, np.array([float(n)]), np.full(4, 12.0), sigma, 30.0)[0]
    assert got / every == pytest.approx(np.sqrt(corr2 / 4.0), rel=0.01)


def test_datum_with_white_part_by_hand() -> None:
    count, mean, sigma, white = np.array([5000.0]), np.array([0.1]), np.array([2.0]), 1.5
    got = datum_sigma_m(count, mean, sigma, 30.0, 500.0, np.array([white]))
    rho = float(spatial_variance_ratio(np.array([5000 * 900.0]), 500.0)[0])
    assert got[0] == pytest.approx(np.sqrt(0.01 + (4.0 - white**2) * rho + white**2 / 5000))
    assert datum_sigma_m(count, mean, sigma, 30.0, 500.0)[0] == pytest.approx(
        np.sqrt(0.01 + 4.0 * rho)
    )


# ------------------------------------------------- glaciers with their own X-band offset


def test_adjusted_glacier_terms_by_hand() -> None:
    """A 2 km2 glacier seen by two scenes (weights 0.25 / 0.75, spans 10 / 12 yr; stable
    spreads 3 and 2 m, 1 m of each white). Adjusted (f = 1): the common part (the reference
    DEM's 2 m correlated error, sqrt(4 - 1) m) leaves the random term, whose scene-own parts
    stay; the penetration term is sqrt(((1 - k) sigma_table)^2 + sigma_adj^2) per year, the
    spread gone. Not adjusted (f = 0): the former terms."""
    n_px = 2e6 / 900.0  # 2 km2 of 30 m pixels
    w = np.array([[0.25], [0.75]])
    px = np.array([[0.6 * n_px], [n_px]])
    years = np.array([10.0, 12.0])
    sigma, white = np.array([3.0, 2.0]), np.array([1.0, 1.0])
    k, table, spread, adj = 0.6, 0.5, 1.2, 0.35
    args = (np.array([-0.4]), w, px, np.array([n_px]))
    rest = (years, np.array([10, 2]), sigma, np.array([0.2, 0.1]), 30.0)
    kw = dict(penetration_std_m=np.array([spread]), stable_white_sigma_m=white)
    adjusted = unit_uncertainty(
        *args, np.array([(1 - k) * table]), *rest, **kw,  # type: ignore[arg-type]
        adjusted_share=np.array([1.0]), adjusted_sigma_m=np.array([adj]),
    )  # fmt: skip
    plain = unit_uncertainty(*args, np.array([table]), *rest, **kw)  # type: ignore[arg-type]
    to_mwe = 0.85
    per_year = 0.25 / 10 + 0.75 / 12
    # correlated parts sqrt(9 - 1) and sqrt(4 - 1) m: the common part is 3 m2 (the smaller)
    own = (0.25 / 10) ** 2 * ((8 - 3) * rho_by_hand(0.6 * 2e6, 500.0) + 1 / (0.6 * n_px)) + (
        0.75 / 12
    ) ** 2 * (0 + 1 / n_px)
    common = 3.0 * rho_by_hand(2e6, 500.0) * per_year**2
    assert adjusted["sigma_random_mwe_yr"][0] == pytest.approx(np.sqrt(own) * to_mwe, rel=1e-12)
    assert plain["sigma_random_mwe_yr"][0] == pytest.approx(
        np.sqrt(common + own) * to_mwe, rel=1e-12
    )
    want_pen = np.sqrt(((1 - k) * table) ** 2 + adj**2) * per_year * to_mwe
    assert adjusted["sigma_penetration_mwe_yr"][0] == pytest.approx(want_pen, rel=1e-12)
    plain_pen = np.sqrt(table**2 + spread**2 * rho_by_hand(2e6, 2000.0)) * per_year * to_mwe
    assert plain["sigma_penetration_mwe_yr"][0] == pytest.approx(plain_pen, rel=1e-12)
    for name in ("sigma_datum_mwe_yr", "sigma_seasonal_mwe_yr", "sigma_density_mwe_yr"):
        assert adjusted[name][0] == plain[name][0]
    # a region half adjusted (f = 0.5): the others keep their common part and spread over
    # their half of the measured area, scaled by (1 - f)
    half = unit_uncertainty(
        *args, np.array([table]), *rest, **kw,  # type: ignore[arg-type]
        adjusted_share=np.array([0.5]), adjusted_sigma_m=np.array([adj]),
    )  # fmt: skip
    common_half = 0.25 * 3.0 * rho_by_hand(1e6, 500.0) * per_year**2
    assert half["sigma_random_mwe_yr"][0] == pytest.approx(
        np.sqrt(common_half + own) * to_mwe, rel=1e-12
    )
    pen_half = np.sqrt(table**2 + 0.25 * spread**2 * rho_by_hand(1e6, 2000.0) + adj**2)
    assert half["sigma_penetration_mwe_yr"][0] == pytest.approx(
        pen_half * per_year * to_mwe, rel=1e-12
    )


def oracle_adjusted(
    sigma: np.ndarray, px: np.ndarray, xy: np.ndarray, member: np.ndarray, range_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unit by unit, pair by pair: f and sqrt(sum_g,h q_g q_h s_g s_h c(d_gh))."""
    share, out = np.zeros(len(member)), np.zeros(len(member))
    for u, row in enumerate(member):
        total = sum(px[g] for g in range(len(px)) if row[g])
        if total == 0:
            continue
        adj = [g for g in range(len(px)) if row[g] and np.isfinite(sigma[g]) and px[g] > 0]
        share[u] = sum(px[g] for g in adj) / total
        var = 0.0
        for g in adj:
            for h in adj:
                d = float(np.hypot(*(xy[g] - xy[h])))
                c = 1 - 1.5 * d / range_m + 0.5 * (d / range_m) ** 3 if d < range_m else 0.0
                var += px[g] * px[h] * sigma[g] * sigma[h] * c
        out[u] = np.sqrt(var) / total
    return share, out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_glaciers=st.integers(1, 12), n_units=st.integers(1, 4))
def test_adjusted_units_match_pairwise_oracle(seed: int, n_glaciers: int, n_units: int) -> None:
    rng = np.random.default_rng(seed)
    sigma = np.where(rng.random(n_glaciers) < 0.6, rng.uniform(0.05, 1.0, n_glaciers), np.nan)
    px = np.where(rng.random(n_glaciers) < 0.9, rng.integers(1, 20_000, n_glaciers), 0.0)
    xy = rng.uniform(0, 6000.0, (n_glaciers, 2))
    member = rng.random((n_units, n_glaciers)) < 0.7
    share, got = adjusted_units(sigma, px, xy, member, 2000.0)
    want_share, want = oracle_adjusted(sigma, px, xy, member, 2000.0)
    np.testing.assert_allclose(share, want_share, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def test_adjusted_units_by_hand() -> None:
    """One glacier keeps its own error; two equal glaciers 5 km apart average it as 1 / sqrt(2);
    at the same place they do not average at all; 1 km apart, c = 1 - 0.75 + 0.0625."""
    sigma, px = np.array([0.4, 0.4]), np.array([1000.0, 1000.0])
    one = adjusted_units(sigma, px, np.array([[0.0, 0.0], [5000.0, 0.0]]), np.array([[1, 0]]))
    assert one[0][0] == 1.0 and one[1][0] == pytest.approx(0.4)
    both = np.array([[1, 1]])
    far = adjusted_units(sigma, px, np.array([[0.0, 0.0], [5000.0, 0.0]]), both)[1][0]
    assert far == pytest.approx(0.4 / np.sqrt(2))
    same = adjusted_units(sigma, px, np.zeros((2, 2)), both)[1][0]
    assert same == pytest.approx(0.4)
    near = adjusted_units(sigma, px, np.array([[0.0, 0.0], [0.0, 1000.0]]), both)[1][0]
    assert near == pytest.approx(0.4 * np.sqrt((2 + 2 * 0.3125) / 4))
    # one of the two not adjusted: half the unit's pixels, its error over the whole unit
    part = adjusted_units(np.array([0.4, np.nan]), px, np.zeros((2, 2)), both)
    assert part[0][0] == 0.5 and part[1][0] == pytest.approx(0.2)
    assert spherical_correlation(np.array([0.0, 1000.0, 2500.0]), 2000.0).tolist() == [
        1.0,
        0.3125,
        0.0,
    ]
