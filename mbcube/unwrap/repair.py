"""Rounds of model-assisted unwrapping, and the per-glacier flags of a scene.

After a scene is unwrapped, stitched and tied, each tile's glacier pixels are summed into
profile histograms (`mbcube.unwrap.profiles`); glaciers with cycle slips get their profile as a
prior, and the tiles holding them are unwrapped again with it (the others pass through); the
new solution is kept on those glaciers only, where it has fewer cuts inside the ice
(`_only_on`); then the scene is stitched and tied again. Rounds stop changing anything once no
glacier needs a repair (later rounds pass through). The last round's profiles give the flags:

- FLAG_OK: no slip found;
- FLAG_REPAIRED: slips found and gone after unwrapping with the prior (area: the pixels that
  had slipped);
- FLAG_DOUBT: slips left after the last round, or segments of the profile whose cycle cannot be
  confirmed (a gap or an ambiguous step between them; `profiles._break_misfits`), or a top near
  half a cycle (`profiles.TOP_MAX_CYCLES`; the whole glacier): area in doubt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mbcube.unwrap.profiles import (
    FLAG_DOUBT,
    FLAG_OK,
    FLAG_REPAIRED,
    PRIOR_DATA,
    PRIOR_NONE,
    PRIOR_USER,
    TOP_MAX_CYCLES,
    GlacierProfiles,
    ProfileHistogram,
    cut_pairs,
    glacier_profiles,
    merge_histograms,
    needs_repair,
    prior_phase,
    profile_histogram,
    slip_limit,
    slipped,
)
from mbcube.unwrap.stitch import EdgeStats, edge_stats
from mbcube.unwrap.tiles import Tile, TileResult, TileSummary, summarize, unwrap_tile

#: Per-glacier outputs of a scene: name -> (dtype, description).
GLACIER_VARIABLES: dict[str, tuple[str, str]] = {
    "unwrap_flag": ("int8", "cycle slips: 0 = none found, 1 = repaired by a prior, 2 = in doubt"),
    "unwrap_prior": ("int8", "prior removed before unwrapping: 0 = none, 1 = data, 2 = user"),
    "unwrap_glacier_px": ("int64", "glacier pixels unwrapped and tied"),
    "unwrap_repaired_px": ("int64", "glacier pixels whose cycle a prior repaired"),
    "unwrap_doubt_px": ("int64", "glacier pixels whose cycle is in doubt"),
    "unwrap_h_amb_m": ("float32", "mean height of ambiguity over the glacier's pixels (m)"),
    "unwrap_toss_up": (
        "int8",
        "1: the glacier's top changed by near half a cycle (its whole cycle is a toss-up unless "
        "another scene settles it at aggregate; not counted in unwrap_doubt_px)",
    ),
}


@dataclass
class RoundPlan:
    """What a round does: the profiles it starts from and the glaciers it unwraps again."""

    profiles: GlacierProfiles
    repair: np.ndarray  # 1-based glacier indices
    repaired_before: np.ndarray  # glaciers unwrapped again in earlier rounds


def tied_phase(result: TileResult, shift: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """The tile core's unwrapped phase after stitching and tying (rad), NaN where not tied."""
    core = result.tile.core_in_window
    labels = result.labels[core]
    if result.n_regions == 0:
        return np.full(labels.shape, np.nan, np.float32)
    node = np.where(labels > 0, labels - 1, 0)
    ok = (labels > 0) & tied[node]
    return np.where(ok, result.phase_rad[core] + 2 * np.pi * shift[node], np.nan)


def tile_histogram(
    result: TileResult,
    shift: np.ndarray,
    tied: np.ndarray,
    glacier_id: np.ndarray,
    elevation_m: np.ndarray,
    bin_m: float,
) -> ProfileHistogram:
    """The profile histogram of a tile's core (arrays `glacier_id`, `elevation_m`: the core's)."""
    return profile_histogram(tied_phase(result, shift, tied), glacier_id, elevation_m, bin_m)


def plan_round(
    hists: list[ProfileHistogram],
    previous: RoundPlan | None,
    min_px: int,
    min_frac: float,
) -> RoundPlan:
    """The profiles of the scene as it stands and the glaciers to unwrap again (the previous
    round's profiles when it repaired nothing: the scene has not changed)."""
    if previous is not None and previous.repair.size == 0:
        return RoundPlan(previous.profiles, previous.repair, previous.repaired_before)
    profiles = glacier_profiles(merge_histograms(hists))
    repair = needs_repair(profiles, min_px, min_frac)
    before = (
        np.union1d(previous.repaired_before, previous.repair)
        if previous is not None
        else np.zeros(0, np.int64)
    )
    return RoundPlan(profiles, repair, before)


def repair_tile(
    previous: TileResult,
    plan: RoundPlan,
    tile: Tile,
    phase_rad: np.ndarray,
    coherence: np.ndarray,
    h_amb_m: np.ndarray,
    radar_mask: np.ndarray | None,
    ref_void: np.ndarray | None,
    glacier_id: np.ndarray,
    elevation_m: np.ndarray,
    user_prior_rad: np.ndarray | None,
    *,
    bin_m: float,
    nlooks: float,
    coherence_min: float,
    engine: str,
) -> TileResult:
    """A tile unwrapped again with the data prior of the plan's glaciers in its window (and the
    user prior elsewhere), or the previous result passed through (changed=False) when none of
    them is in the window."""
    if plan.repair.size == 0 or not np.isin(glacier_id, plan.repair).any():
        return TileResult(
            previous.tile,
            previous.phase_rad,
            previous.labels,
            previous.n_regions,
            previous.n_in_scene,
            previous.engine_called,
            changed=False,
        )
    data = prior_phase(plan.profiles, plan.repair, glacier_id, elevation_m, bin_m)
    prior = (
        data
        if user_prior_rad is None
        else np.where(np.isin(glacier_id, plan.repair), data, user_prior_rad)
    )
    again = unwrap_tile(
        tile,
        phase_rad,
        coherence,
        h_amb_m,
        radar_mask,
        ref_void,
        nlooks=nlooks,
        coherence_min=coherence_min,
        engine=engine,
        prior_rad=prior,
    )
    before = cut_pairs(previous.phase_rad, glacier_id)
    after = cut_pairs(again.phase_rad, glacier_id)
    better = [g for g in plan.repair.tolist() if after.get(g, 0) < before.get(g, 0)]
    return _only_on(previous, again, np.isin(glacier_id, better))


def _only_on(previous: TileResult, again: TileResult, inside: np.ndarray) -> TileResult:
    """`again` on the `inside` pixels (the repaired glaciers whose cuts inside the ice the prior
    reduced: a prior that cut the ice where it was whole is not taken), `previous` everywhere
    else: the engine solves the whole window, and where no prior changed anything its new
    solution may still differ (cycle choices elsewhere in the window); those pixels keep what
    they had. Per connected region, `again` is shifted by the whole cycles that make it agree
    with `previous` on the region's other pixels (the engine's constant is arbitrary)."""
    labels = previous.labels  # same inputs, same valid mask, same regions
    both = (labels > 0) & np.isfinite(previous.phase_rad) & np.isfinite(again.phase_rad)
    outside = both & ~inside
    shift = np.zeros(previous.n_regions + 1, np.int64)
    if outside.any():
        d = np.rint((previous.phase_rad[outside] - again.phase_rad[outside]) / (2 * np.pi))
        region = labels[outside].astype(np.int64)
        d = d.astype(np.int64)
        lo = int(d.min())
        width = int(d.max()) - lo + 1
        keys, counts = np.unique(region * width + (d - lo), return_counts=True)
        order = np.lexsort((-counts, keys // width))  # per region, the most frequent first
        first = np.unique(keys[order] // width, return_index=True)[1]
        best = keys[order][first]
        shift[best // width] = best % width + lo
    phase = previous.phase_rad.copy()
    take = both & inside
    phase[take] = again.phase_rad[take] + 2 * np.pi * shift[labels[take]]
    return TileResult(
        previous.tile,
        phase,
        labels,
        previous.n_regions,
        previous.n_in_scene,
        again.engine_called,
        changed=True,
    )


def summarize_again(
    result: TileResult, previous: TileSummary, stable: np.ndarray | None
) -> TileSummary:
    return summarize(result, stable) if result.changed else previous


def edge_again(a: TileResult, b: TileResult, previous: EdgeStats) -> EdgeStats:
    return edge_stats(a, b) if (a.changed or b.changed) else previous


def user_prior_rad(prior_dh_m: np.ndarray, h_amb_m: np.ndarray) -> np.ndarray:
    """A user's prior dh (m) as phase (rad): 2 pi dh / h_amb; 0 where either is missing."""
    with np.errstate(invalid="ignore", divide="ignore"):
        phase = 2 * np.pi * prior_dh_m / h_amb_m
    return np.where(np.isfinite(phase), phase, 0.0)


def glacier_flags(
    first: RoundPlan,
    final: RoundPlan,
    user_prior_glaciers: np.ndarray,
    n_glaciers: int,
    min_px: int,
    min_frac: float,
) -> dict[str, np.ndarray]:
    """Per glacier (G,) arrays of GLACIER_VARIABLES from the first round's profiles (before any
    repair), the final ones and the glaciers a user prior covers (1-based)."""
    out = {
        name: np.zeros(n_glaciers, dtype=np.dtype(dtype))
        for name, (dtype, _) in GLACIER_VARIABLES.items()
        if name != "unwrap_h_amb_m"
    }
    fin = final.profiles
    index = fin.glacier - 1
    out["unwrap_glacier_px"][index] = fin.n_px
    limit = slip_limit(fin.n_px, min_px, min_frac)
    left = slipped(fin, min_px, min_frac)
    doubt = np.where(left, fin.slipped_px, 0) + np.where(fin.doubt_px >= limit, fin.doubt_px, 0)
    doubt = np.minimum(doubt, fin.n_px)
    # a top near half a cycle: the whole glacier's cycle is a toss-up (a user prior settles it;
    # another scene may, at aggregate)
    toss_up = (np.abs(fin.top_cycles) > TOP_MAX_CYCLES) & ~np.isin(fin.glacier, user_prior_glaciers)
    out["unwrap_toss_up"][index] = toss_up
    out["unwrap_doubt_px"][index] = doubt
    repaired = final.repaired_before
    found = first.profiles
    in_first = np.isin(found.glacier, repaired)
    out["unwrap_repaired_px"][found.glacier[in_first] - 1] = found.slipped_px[in_first]
    flag = np.full(n_glaciers, FLAG_OK, np.int8)
    flag[repaired - 1] = FLAG_REPAIRED
    flag[index[(doubt > 0) | toss_up]] = FLAG_DOUBT
    out["unwrap_flag"] = flag
    prior = np.full(n_glaciers, PRIOR_NONE, np.int8)
    prior[user_prior_glaciers - 1] = PRIOR_USER
    prior[repaired - 1] = PRIOR_DATA
    out["unwrap_prior"] = prior
    return out
