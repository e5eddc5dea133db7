"""mbcube.unit_sums against a slow loop over units, glaciers and cells."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mbcube.unit_sums import UNIT_FIELDS, Units, atoms


def _cells(seed: int, n_glaciers: int, n_cells: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random non-empty cells sorted by glacier, each (glacier, cell) once."""
    rng = np.random.default_rng(seed)
    keep = rng.random((n_glaciers, n_cells)) < 0.4
    glacier, cell = np.nonzero(keep)
    k = len(glacier)
    n_px = rng.integers(1, 60, k).astype(float)
    count = np.floor(n_px * rng.random(k))
    area = n_px * 900.0
    weight = area * np.where(count > 0, rng.uniform(0.5, 1.0, k), 0.0)
    values = {
        "count": count,
        "area_m2": area,
        "weight": weight,
        "rate_sum": weight * rng.normal(-0.5, 1.0, k),
        "dh_sum": weight * rng.normal(-6.0, 10.0, k),
        "n_px": n_px,
        "measured_bin_px": np.minimum(count, n_px),
    }
    return glacier, cell, values


def _oracle(glacier, cell, values, membership, n_cells, min_px):  # type: ignore[no-untyped-def]
    out = np.zeros((membership.shape[0], len(UNIT_FIELDS), n_cells))
    for u in range(membership.shape[0]):
        for i in range(len(glacier)):
            if not membership[u, glacier[i]]:
                continue
            c, v = cell[i], {k: values[k][i] for k in values}
            if v["count"] >= min_px:
                out[u, 0, c] += v["count"]
                out[u, 1, c] += v["area_m2"]
                out[u, 2, c] += v["area_m2"] * v["rate_sum"] / v["weight"]
                out[u, 3, c] += v["area_m2"] * v["dh_sum"] / v["weight"]
                out[u, 6, c] += v["measured_bin_px"]
            out[u, 4, c] += v["area_m2"]
            out[u, 5, c] += v["n_px"]
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_glaciers=st.integers(1, 12),
    n_units=st.integers(1, 20),
    n_cells=st.integers(1, 9),
    min_px=st.integers(1, 30),
)
def test_unit_sums_equal_a_loop_over_units_and_cells(
    seed: int, n_glaciers: int, n_units: int, n_cells: int, min_px: int
) -> None:
    glacier, cell, values = _cells(seed, n_glaciers, n_cells)
    membership = np.random.default_rng(seed + 1).random((n_units, n_glaciers)) < 0.5
    got = Units.of(membership).cell_sums(glacier, cell, values, n_cells, min_px)
    want = _oracle(glacier, cell, values, membership, n_cells, min_px)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_a_glacier_in_no_unit_adds_nothing_and_one_in_two_units_adds_to_both() -> None:
    glacier, cell = np.array([0, 1, 1]), np.array([2, 0, 2])
    values = {
        "count": np.array([20.0, 5.0, 30.0]),
        "area_m2": np.array([1e4, 2e4, 3e4]),
        "weight": np.array([1e4, 2e4, 3e4]),
        "rate_sum": np.array([-1e4, 0.0, 6e4]),  # mean rates -1 and +2 m/yr
        "dh_sum": np.array([-1e5, 0.0, 6e5]),
        "n_px": np.array([20.0, 40.0, 30.0]),
        "measured_bin_px": np.array([20.0, 5.0, 30.0]),
    }
    membership = np.array([[False, True], [True, True]])
    got = Units.of(membership).cell_sums(glacier, cell, values, 3, 10)
    # unit 0 holds glacier 1 only: its cell 0 (5 px) is below min_px, so only areas and pixels
    np.testing.assert_array_equal(got[0, :, 0], [0, 0, 0, 0, 2e4, 40, 0])
    np.testing.assert_array_equal(got[0, :, 2], [30, 3e4, 6e4, 6e5, 3e4, 30, 30])
    # unit 1 holds both: cell 2 sums glacier 0 (-1 m/yr on 1e4 m2) and glacier 1 (+2 on 3e4)
    np.testing.assert_array_equal(got[1, :, 2], [50, 4e4, 5e4, 5e5, 4e4, 50, 50])


def test_atoms_group_glaciers_by_their_units() -> None:
    rng = np.random.default_rng(3)
    member = rng.random((19, 500)) < 0.3  # 19 units: three bytes per glacier
    member[:, :250] = member[:, :1]  # half the glaciers share one pattern
    patterns, atom_of = atoms(member)
    np.testing.assert_array_equal(patterns[atom_of], member.T)
    assert len({p.tobytes() for p in patterns}) == len(patterns)  # distinct
    assert len(patterns) <= 251


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_glaciers=st.integers(1, 40),
    n_units=st.integers(1, 20),
    n_rows=st.integers(1, 4),
)
def test_unit_sums_of_glacier_values_equal_a_matrix_product(
    seed: int, n_glaciers: int, n_units: int, n_rows: int
) -> None:
    rng = np.random.default_rng(seed)
    membership = rng.random((n_units, n_glaciers)) < 0.3  # some glaciers in no unit
    values = rng.normal(size=(n_rows, n_glaciers))
    units = Units.of(membership)
    np.testing.assert_allclose(units.sum(values), values @ membership.T.astype(float), atol=1e-12)
    np.testing.assert_allclose(units.sum(values[0]), membership @ values[0], atol=1e-12)
    assert units.sum(values).shape == (n_rows, n_units)


def test_more_than_64_units_and_empty_sets() -> None:
    """Glaciers of more than 64 units are told apart by their whole unit set (not one word);
    no unit or no glacier gives empty sums of the right shape."""
    rng = np.random.default_rng(5)
    member = rng.random((70, 300)) < 0.2
    member[:, 150:] = member[:, :150]
    member[69, 0] = ~member[69, 0]  # glaciers 0 and 150 differ in the 70th unit only
    patterns, atom_of = atoms(member)
    np.testing.assert_array_equal(patterns[atom_of], member.T)
    assert atom_of[0] != atom_of[150]
    values = rng.normal(size=300)
    np.testing.assert_allclose(Units.of(member).sum(values), member @ values, atol=1e-12)
    assert Units.of(np.zeros((0, 5), bool)).sum(np.ones(5)).shape == (0,)
    np.testing.assert_array_equal(Units.of(np.zeros((3, 0), bool)).sum(np.ones((2, 0))), 0.0)


def _sequential(per_atom: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Each unit's atoms' rows added one after another, in atom order, from 0.0 (Python floats:
    the order is the spec)."""
    out = np.zeros((patterns.shape[1], per_atom.shape[1]))
    for u in range(patterns.shape[1]):
        for w in range(per_atom.shape[1]):
            acc = 0.0
            for a in range(per_atom.shape[0]):
                if patterns[a, u]:
                    acc = acc + float(per_atom[a, w])
            out[u, w] = acc
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_glaciers=st.integers(1, 60),
    n_units=st.integers(1, 12),
    width=st.integers(2, 9),
)
def test_unit_totals_add_the_atoms_in_order_bitwise(
    seed: int, n_glaciers: int, n_units: int, width: int
) -> None:
    """Units.totals adds exactly the unit's atoms, in atom order (the same floats as a loop),
    magnitudes from 1e-6 to 1e9 so that the order shows; a unit of no atom is 0."""
    rng = np.random.default_rng(seed)
    membership = rng.random((n_units, n_glaciers)) < 0.4
    units = Units.of(membership)
    n_atoms = len(units.patterns)
    per_atom = rng.normal(size=(n_atoms, width)) * 10.0 ** rng.integers(-6, 10, (n_atoms, width))
    got = units.totals(per_atom)
    want = _sequential(per_atom, units.patterns)
    assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(got[~membership.any(axis=1)], 0.0)
    np.testing.assert_array_equal(units.count(), membership.sum(axis=1))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_units=st.integers(1, 8), min_px=st.integers(1, 30))
def test_cell_sums_in_blocks_equal_one_bincount_per_field_bitwise(
    seed: int, n_units: int, min_px: int
) -> None:
    """Blocks of cells (np.add.at, CELL_BLOCK = 7 here) give the bytes of one bincount over all
    cells per field with zeros for the cells not measured enough, then the atoms' rows summed
    in order: the summation order does not depend on the blocks."""
    import mbcube.unit_sums as unit_sums

    glacier, cell, values = _cells(seed, 30, 9)
    membership = np.random.default_rng(seed + 2).random((n_units, 30)) < 0.5
    units = Units.of(membership)
    n_atoms, size = len(units.patterns), len(units.patterns) * 9
    valid = values["count"] >= min_px
    share = np.divide(values["area_m2"], values["weight"], out=np.zeros(len(cell)), where=valid)
    fields = (
        np.where(valid, values["count"], 0.0),
        np.where(valid, values["area_m2"], 0.0),
        share * values["rate_sum"],
        share * values["dh_sum"],
        values["area_m2"],
        values["n_px"],
        np.where(valid, values["measured_bin_px"], 0.0),
    )
    key = units.atom_of[glacier] * 9 + cell
    per_atom = np.stack([np.bincount(key, f, minlength=size).reshape(n_atoms, 9) for f in fields])
    want = units.totals(per_atom.transpose(1, 0, 2).reshape(n_atoms, -1)).reshape(-1, 7, 9)
    saved = unit_sums.CELL_BLOCK
    unit_sums.CELL_BLOCK = 7
    try:
        got = units.cell_sums(glacier, cell, values, 9, min_px)
    finally:
        unit_sums.CELL_BLOCK = saved
    assert np.ascontiguousarray(got).tobytes() == want.tobytes()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_units=st.integers(0, 150), n_glaciers=st.integers(0, 80))
def test_atoms_in_code_order_with_their_first_glacier(
    seed: int, n_units: int, n_glaciers: int
) -> None:
    """Atoms come in the order of their packed unit bits (<= 64 units: as a little-endian
    integer; more: byte by byte), once each, and each glacier's atom holds its units: the
    order the unit sums add them in."""
    rng = np.random.default_rng(seed)
    member = rng.random((n_units, n_glaciers)) < rng.random()
    member[:, n_glaciers // 2 :] = member[:, : n_glaciers - n_glaciers // 2]
    patterns, atom_of = atoms(member)
    np.testing.assert_array_equal(patterns[atom_of], member.T)
    packed = [bytes(np.packbits(p)) for p in patterns]
    if n_units <= 64:
        codes = [int.from_bytes(b, "little") for b in packed]
    else:
        codes = [int.from_bytes(b, "big") for b in packed]
    assert codes == sorted(codes) and len(set(codes)) == len(codes)
