"""Glacier elevation profiles of a scene's phase: find cycle slips, and the prior that repairs them.

Why. Where a glacier tongue thinned (or a surge front thickened) by more than h_amb / 2 at its
outline, the true phase jumps by more than pi between neighbouring pixels. No unwrapper can see
such a jump in wrapped phase: minimum-cost flow puts the tongue on a wrong cycle, consistently,
and the scene's quality numbers look perfect.

What is robust. Along a glacier, dh changes slowly with elevation (a few m per 50 m bin), and the
circular mean of the WRAPPED phase of one elevation bin does not depend on any unwrapping. So per
glacier and bin of the reference DEM's elevation (width `bin_m`):

1. c_k = the circular mean of the phase of the bin's pixels (cycles, in [-1/2, 1/2)), and R_k its
   mean resultant length (1: all pixels agree; bins with R_k < MIN_RESULTANT or fewer than
   MIN_BIN_PX pixels are left out);
2. the profile P_k = c_k unwrapped along elevation (steps wrapped to [-1/2, 1/2) cycle). It breaks
   into segments at gaps of more than MAX_GAP_BINS bins and at steps larger than
   MAX_STEP_CYCLES, where continuity along elevation says nothing;
3. each segment's whole cycle is the one most of its unwrapped pixels agree with (its anchor);
   the top segment's, the one most pixels of its highest bins (TOP_ANCHOR_FRAC of its pixels)
   agree with. The assumption: the top of a glacier (accumulation area, near its balance)
   changed by less than h_amb / 2, so the unwrapper tied it right to the ground around it;
   the tongue may have changed by any amount, and the profile carries the cycle down to it.
   A top more than TOP_MAX_CYCLES from the ground's cycle puts the whole glacier in doubt
   (unless a user prior took the top's change out of what the unwrapper saw);
   A surge-type glacier breaks the assumption (its reservoir may thin by tens of metres): a
   profile whose change grows toward the tongue is not used as a prior (its slips stay in
   doubt; measured on the `tongues` benchmark: a surge glacier "repaired" 2.9 m w.e./yr off);
4. a pixel DISAGREES when its unwrapped phase lies a cycle or more from its bin's profile
   (|phase / 2 pi - P_k - anchor| > SLIP_CYCLES); a glacier SLIPPED when enough pixels disagree
   and its unwrapped phase also jumps by more than pi inside the ice (CUT_PER_WIDTH: the cut
   the unwrapper made across it), since disagreeing pixels alone may be real spread;
5. at a break between two segments, the step between their anchored ends is compared with the
   profile's slope carried across the break; a misfit above BREAK_MISFIT_CYCLES means the part
   below may sit on a wrong cycle: the pixels of every segment below the lowest such break
   are IN DOUBT.

The prior of a glacier is its profile P(z) in radians (2 pi P, interpolated between bin centres):
removed from the wrapped phase before unwrapping and added back after, it takes the jump at the
outline out of the phase the unwrapper sees (`mbcube.unwrap.tiles.unwrap_tile`).

Everything here works on small per-(glacier, bin, 1/CYCLE_BINS cycle) histograms summed over
tiles, never on a scene's pixels at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Histogram resolution of the unwrapped phase: 1/CYCLE_BINS cycle.
CYCLE_BINS = 32
#: A bin enters the profile with at least this many pixels ...
MIN_BIN_PX = 6
#: ... whose phases agree this well (mean resultant length, 0..1; 0.3 ~ a spread of 0.25 cycle).
MIN_RESULTANT = 0.3
#: More missing bins than this between two bins with data break the profile.
MAX_GAP_BINS = 2
#: A step between neighbouring bins larger than this (cycles) breaks the profile (ambiguous).
MAX_STEP_CYCLES = 0.3
#: A pixel this far (cycles) from its bin's profile sits on another cycle (a slip).
SLIP_CYCLES = 0.6
#: A break whose two ends differ by more than this (cycles) beyond the carried slope puts the part
#: below it in doubt: the other whole cycle would fit it better (0.3 flagged a glacier of the
#: demo study whose cycles were right).
BREAK_MISFIT_CYCLES = 0.5
#: A glacier slips only where its unwrapped phase also jumps by more than pi between enough pairs
#: of its own neighbouring pixels (a cut across the ice): CUT_PER_WIDTH x sqrt(its pixels) (a cut
#: across it is about as long as it is wide), within [MIN_CUT_PAIRS, MAX_CUT_PAIRS]. Without it,
#: a glacier whose change varies within an elevation bin by more than h_amb / 2 (margins,
#: debris, tributaries) would look slipped. Measured at 30 m: a cut across a slipped tongue
#: 13-30 pairs, noise <= 6 (1,400 px glacier; the slipped-pixel test must hold too); at 94 m a
#: narrow real tongue (900 px glacier): 6-7 pairs, a 200 px glacier's: ~5.
CUT_PER_WIDTH = 0.15
MIN_CUT_PAIRS = 3
MAX_CUT_PAIRS = 8
#: On a glacier smaller than alias_min_px / SMALL_GLACIER_FRAC pixels, this share of it slipped
#: is enough (`slip_limit`).
SMALL_GLACIER_FRAC = 0.1
#: The top segment's whole cycle is the one the pixels of its highest bins holding this share of
#: its pixels agree with.
TOP_ANCHOR_FRAC = 0.25
#: A top that changed by more than this (cycles, after anchoring) may itself sit on the wrong
#: cycle (a change of h_amb / 2 reads the same as - h_amb / 2): the whole glacier is in doubt.
#: Measured on the tongues benchmark at 90 m: tops of +19 m with h_amb 38 m put whole glaciers
#: one cycle off (0.6-1.4 m w.e./yr), consistently, "repaired".
TOP_MAX_CYCLES = 0.4

#: prior codes (per glacier and scene): which prior its unwrapping used
PRIOR_NONE, PRIOR_DATA, PRIOR_USER = 0, 1, 2
PRIOR_NAMES = {PRIOR_NONE: "none", PRIOR_DATA: "data", PRIOR_USER: "user"}
#: flag codes (per glacier and scene)
FLAG_OK, FLAG_REPAIRED, FLAG_DOUBT = 0, 1, 2
FLAG_NAMES = {FLAG_OK: "ok", FLAG_REPAIRED: "repaired", FLAG_DOUBT: "in doubt"}


@dataclass
class ProfileHistogram:
    """Pixel counts per (glacier, elevation bin, 1/CYCLE_BINS cycle of unwrapped phase), and
    per glacier the pairs of its neighbouring pixels whose phase differs by more than pi."""

    glacier: np.ndarray  # int64, 1-based glacier index
    zbin: np.ndarray  # int64, floor(z / bin_m)
    cycle_bin: np.ndarray  # int64, floor(phase / 2 pi * CYCLE_BINS)
    count: np.ndarray  # int64
    cuts: dict[int, int] = field(default_factory=dict)  # glacier -> cut pairs

    @staticmethod
    def empty() -> ProfileHistogram:
        e = np.zeros(0, np.int64)
        return ProfileHistogram(e, e, e, e)


def cut_pairs(phase_rad: np.ndarray, glacier_id: np.ndarray) -> dict[int, int]:
    """Per glacier: pairs of 4-neighbouring pixels of that glacier, both with a phase, whose
    unwrapped phase (rad) differs by more than pi (cuts inside the ice)."""
    counts: dict[int, int] = {}
    pairs = (
        (phase_rad[:-1], phase_rad[1:], glacier_id[:-1], glacier_id[1:]),
        (phase_rad[:, :-1], phase_rad[:, 1:], glacier_id[:, :-1], glacier_id[:, 1:]),
    )
    for a, b, ga, gb in pairs:
        with np.errstate(invalid="ignore"):
            jump = (ga == gb) & (ga > 0) & (np.abs(a - b) > np.pi)  # NaN compares False
        found, n = np.unique(ga[jump], return_counts=True)
        for g, k in zip(found.tolist(), n.tolist(), strict=True):
            counts[g] = counts.get(g, 0) + k
    return counts


def profile_histogram(
    phase_unw_rad: np.ndarray, glacier_id: np.ndarray, elevation_m: np.ndarray, bin_m: float
) -> ProfileHistogram:
    """The histogram of one block: glacier pixels (glacier_id > 0) with finite unwrapped phase
    (rad) and elevation (m)."""
    pick = (glacier_id > 0) & np.isfinite(phase_unw_rad) & np.isfinite(elevation_m)
    if not pick.any():
        return ProfileHistogram.empty()
    g = glacier_id[pick].astype(np.int64)
    z = np.floor(elevation_m[pick] / bin_m).astype(np.int64)
    c = np.floor(phase_unw_rad[pick].astype(np.float64) / (2 * np.pi) * CYCLE_BINS).astype(np.int64)
    hist = _count(g, z, c, np.ones(g.size, np.int64))
    hist.cuts = cut_pairs(phase_unw_rad, glacier_id)
    return hist


def _count(g: np.ndarray, z: np.ndarray, c: np.ndarray, n: np.ndarray) -> ProfileHistogram:
    """Counts summed per distinct (g, z, c), by one int64 key (a 1-d unique is fast)."""
    lo = [int(a.min()) for a in (g, z, c)]
    span_z, span_c = int(z.max()) - lo[1] + 1, int(c.max()) - lo[2] + 1
    key = ((g - lo[0]) * span_z + (z - lo[1])) * span_c + (c - lo[2])
    uniq, inverse = np.unique(key, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=n, minlength=uniq.size).astype(np.int64)
    return ProfileHistogram(
        uniq // (span_z * span_c) + lo[0],
        uniq // span_c % span_z + lo[1],
        uniq % span_c + lo[2],
        counts,
    )


def merge_histograms(parts: list[ProfileHistogram]) -> ProfileHistogram:
    """The sum of several blocks' histograms."""
    parts = [p for p in parts if p.count.size]
    if not parts:
        return ProfileHistogram.empty()
    merged = _count(
        np.concatenate([p.glacier for p in parts]),
        np.concatenate([p.zbin for p in parts]),
        np.concatenate([p.cycle_bin for p in parts]),
        np.concatenate([p.count for p in parts]),
    )
    for part in parts:
        for g, k in part.cuts.items():
            merged.cuts[g] = merged.cuts.get(g, 0) + k
    return merged


@dataclass
class GlacierProfiles:
    """Per glacier seen in a scene (1-based `glacier`): pixels, slipped and doubtful pixels, and
    the profile (bin index, cycles) of every bin that entered it."""

    glacier: np.ndarray  # (n,) int64
    n_px: np.ndarray  # (n,) int64 unwrapped glacier pixels with an elevation
    slipped_px: np.ndarray  # (n,) int64 pixels a cycle or more off their bin's profile
    doubt_px: np.ndarray  # (n,) int64 pixels of segments whose cycle the profile cannot confirm
    cut_pairs: np.ndarray  # (n,) int64 neighbouring pixel pairs with a phase jump > pi
    top_cycles: np.ndarray  # (n,) the anchored profile at the glacier's top (cycles)
    profile_zbin: dict[int, np.ndarray] = field(default_factory=dict)
    profile_cycles: dict[int, np.ndarray] = field(default_factory=dict)
    profile_px: dict[int, np.ndarray] = field(default_factory=dict)  # pixels per profile bin

    def of(self, glacier: int) -> int:
        """Row of a glacier (ValueError when it was not seen)."""
        at = int(np.searchsorted(self.glacier, glacier))
        if at >= self.glacier.size or self.glacier[at] != glacier:
            raise ValueError(f"glacier {glacier} has no profile")
        return at


def _wrap(cycles: np.ndarray) -> np.ndarray:
    """Wrapped to [-1/2, 1/2) cycle."""
    return cycles - np.floor(cycles + 0.5)


def glacier_profiles(hist: ProfileHistogram) -> GlacierProfiles:
    """Profiles, slips and doubt of every glacier in a scene's summed histogram (module doc)."""
    order = np.lexsort((hist.cycle_bin, hist.zbin, hist.glacier))
    g, z, c, n = (a[order] for a in (hist.glacier, hist.zbin, hist.cycle_bin, hist.count))
    x = (c + 0.5) / CYCLE_BINS  # cycles (bin centres)
    glaciers, starts = np.unique(g, return_index=True)
    ends = np.append(starts[1:], g.size)
    n_px = np.zeros(glaciers.size, np.int64)
    slipped = np.zeros(glaciers.size, np.int64)
    doubt = np.zeros(glaciers.size, np.int64)
    top = np.zeros(glaciers.size)
    cuts = np.array([hist.cuts.get(int(g), 0) for g in glaciers], np.int64)
    out = GlacierProfiles(glaciers.astype(np.int64), n_px, slipped, doubt, cuts, top)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        n_px[i] = int(n[s:e].sum())
        zbins, p, px, slipped[i], doubt[i], top[i] = _one_glacier(z[s:e], x[s:e], n[s:e])
        out.profile_zbin[int(glaciers[i])] = zbins
        out.profile_cycles[int(glaciers[i])] = p
        out.profile_px[int(glaciers[i])] = px
    return out


def _one_glacier(
    z: np.ndarray, x: np.ndarray, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, float]:
    """One glacier's entries (sorted by z): its profile bins, cycles and pixels per bin,
    slipped and doubtful pixel counts, the anchored top's cycles."""
    zb, first = np.unique(z, return_index=True)
    weight = np.add.reduceat(n, first).astype(float)
    phasor = np.add.reduceat(n * np.exp(2j * np.pi * x), first)
    resultant = np.abs(phasor) / weight
    good = (weight >= MIN_BIN_PX) & (resultant >= MIN_RESULTANT)
    if not good.any():
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), 0, 0, 0.0
    zk, ck, wk = zb[good], np.angle(phasor[good]) / (2 * np.pi), weight[good]
    step = _wrap(np.diff(ck))
    breaks = (np.diff(zk) > MAX_GAP_BINS + 1) | (np.abs(step) > MAX_STEP_CYCLES)
    segment = np.concatenate(([0], np.cumsum(breaks)))
    profile = ck[0] + np.concatenate(([0.0], np.cumsum(np.where(breaks, 0.0, step))))
    # every entry's bin in the profile (-1: its bin is not in it)
    at = np.searchsorted(zk, z)
    in_profile = (at < zk.size) & (zk[np.minimum(at, zk.size - 1)] == z)
    at = np.where(in_profile, at, 0)
    seg_of = np.where(in_profile, segment[at], -1)
    offset = np.rint(x - profile[at]).astype(np.int64)
    n_segments = int(segment[-1]) + 1
    seg_px = np.zeros(n_segments, np.int64)
    top = np.zeros(zk.size, bool)
    for k in range(n_segments):
        mine = seg_of == k
        seg_px[k] = int(n[mine].sum())
        if k == n_segments - 1:  # the top segment votes with its highest pixels only
            bins = np.flatnonzero(segment == k)
            share = np.cumsum(wk[bins][::-1]) / wk[bins].sum()
            lowest_top_bin = zk[bins][::-1][int(np.searchsorted(share, TOP_ANCHOR_FRAC))]
            mine &= z >= lowest_top_bin
            top = (segment == k) & (zk >= lowest_top_bin)
        values, inverse = np.unique(offset[mine], return_inverse=True)
        votes = np.bincount(inverse.ravel(), weights=n[mine])
        profile[segment == k] += values[int(np.argmax(votes))]
    off = np.abs(x - profile[at])
    slipped = int(n[in_profile & (off > SLIP_CYCLES)].sum())
    # the lowest break whose ends misfit: every segment below it is in doubt
    doubt = 0
    for k in range(n_segments - 1, 0, -1):
        if _break_misfits(zk, profile, segment, k):
            doubt = int(seg_px[:k].sum())
            break
    top_cycles = float(np.average(profile[top], weights=wk[top]))
    return zk.astype(np.int64), profile, wk, slipped, doubt, top_cycles


def _break_misfits(zk: np.ndarray, profile: np.ndarray, segment: np.ndarray, k: int) -> bool:
    """Whether the step between the anchored ends of segments k - 1 and k misfits the slope
    carried across the break (BREAK_MISFIT_CYCLES)."""
    lo = np.flatnonzero(segment == k - 1)
    hi = np.flatnonzero(segment == k)
    a, b = lo[-1], hi[0]
    slopes = []
    for side in (lo[-3:], hi[:3]):
        if side.size >= 2:
            slopes.append((profile[side[-1]] - profile[side[0]]) / (zk[side[-1]] - zk[side[0]]))
    slope = float(np.mean(slopes)) if slopes else 0.0
    misfit = profile[b] - profile[a] - slope * (zk[b] - zk[a])
    return bool(abs(misfit) > BREAK_MISFIT_CYCLES)


def prior_phase(
    profiles: GlacierProfiles,
    glaciers: np.ndarray,
    glacier_id: np.ndarray,
    elevation_m: np.ndarray,
    bin_m: float,
) -> np.ndarray:
    """The data prior (rad) of a block: 2 pi P(z) on the pixels of `glaciers` (profile cycles
    interpolated linearly between bin centres, held flat beyond the ends), 0 elsewhere."""
    out = np.zeros(glacier_id.shape, np.float64)
    for g in np.intersect1d(np.unique(glacier_id), glaciers):
        zbins = profiles.profile_zbin.get(int(g))
        if zbins is None or zbins.size == 0:
            continue
        on = (glacier_id == g) & np.isfinite(elevation_m)
        centres = (zbins + 0.5) * bin_m
        out[on] = 2 * np.pi * np.interp(elevation_m[on], centres, profiles.profile_cycles[int(g)])
    return out


def slip_limit(n_px: np.ndarray, min_px: int, min_frac: float) -> np.ndarray:
    """Pixels a cycle off (or in doubt) that count on glaciers of n_px unwrapped pixels:
    min_px and min_frac of the glacier, but on a small glacier SMALL_GLACIER_FRAC of it is
    enough (a 85 px glacier at 90 m hid a 17 px slipped tongue below 20 px), at least 3."""
    n = np.asarray(n_px, dtype=float)
    return np.maximum(np.maximum(np.minimum(min_px, SMALL_GLACIER_FRAC * n), min_frac * n), 3)


def slipped(profiles: GlacierProfiles, min_px: int, min_frac: float) -> np.ndarray:
    """(n,) bool: enough pixels a cycle off their profile (`slip_limit`) and a cut across the
    ice (CUT_PER_WIDTH x sqrt(pixels), clipped)."""
    limit = slip_limit(profiles.n_px, min_px, min_frac)
    cuts = np.clip(CUT_PER_WIDTH * np.sqrt(profiles.n_px), MIN_CUT_PAIRS, MAX_CUT_PAIRS)
    return (profiles.slipped_px >= limit) & (profiles.cut_pairs >= cuts)


def thickening_downward(profiles: GlacierProfiles) -> np.ndarray:
    """(n,) bool: the profile's change grows toward LOWER elevation (the pixel-weighted slope
    of cycles on elevation is negative): a surge front, where the top anchor is not to be
    trusted (a surge's reservoir may have thinned by more than h_amb / 2)."""
    out = np.zeros(profiles.glacier.size, bool)
    for i, g in enumerate(profiles.glacier.tolist()):
        z, p, w = profiles.profile_zbin[g], profiles.profile_cycles[g], profiles.profile_px[g]
        if z.size < 2:
            continue
        zc = z - np.average(z, weights=w)
        out[i] = float(np.sum(w * zc * (p - np.average(p, weights=w)))) < 0
    return out


def needs_repair(profiles: GlacierProfiles, min_px: int, min_frac: float) -> np.ndarray:
    """Glaciers (1-based) that slipped (`slipped`) and whose profile thins toward the tongue:
    to unwrap again with their prior. A slipped glacier thickening downward stays in doubt."""
    ok = slipped(profiles, min_px, min_frac) & ~thickening_downward(profiles)
    return profiles.glacier[ok]
