"""`mbcube verify STORE [--repair]`: is everything the steps recorded still there and readable?

The store's integrity (`mbcube.store.integrity`: every recorded file present, of its recorded
size, every chunk decoding with its checksum, metadata parsing, flags matching records) and the
cached statistics of aggregate (`mbcube.aggregate.cache_problems`: the same numbers as the
stored statistics give again). `repair` forgets the records of what is damaged and deletes a
damaged cache, so that the next `mbcube run` redoes exactly that and what depends on it.
Holds the store's writer lock (a run in progress would look damaged half-way); a store it may not
write (read-only) is checked without it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mbcube import store as st
from mbcube.aggregate import CACHE_GROUP, cache_problems
from mbcube.store.integrity import NEW_STORE, Damage, check, repair, temporary_files
from mbcube.store.lock import writer_lock_if_writable


@dataclass
class VerifyReport:
    """What verify found and, with repair, what the next run redoes."""

    store: Path
    damages: list[Damage] = field(default_factory=list)
    cache: list[str] = field(default_factory=list)
    temporary_files: int = 0
    redo: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.damages and not self.cache

    @property
    def needs_new_store(self) -> bool:
        """Damage that no step makes again in place (static layers, coordinates, root)."""
        return any(d.step == NEW_STORE for d in self.damages)

    @property
    def repairable(self) -> bool:
        return bool(self.cache) or any(d.step != NEW_STORE for d in self.damages)

    def lines(self) -> list[str]:
        """What to print: one line per problem, then the command that repairs them."""
        found = [d.line() for d in self.damages] + self.cache
        if self.ok:
            done = "every recorded file is present, of its size, and decodes"
            return [f"{self.store}: ok ({done})"]
        out = [f"{self.store}: {len(found)} problem(s):", *(f"  - {line}" for line in found)]
        study = st.read_state(self.store).get("study", {}).get("root", "STUDY")
        rerun = f"`mbcube run {study} --store {self.store}`"
        if self.needs_new_store:
            out.append(
                "the static layers, coordinates or root of a store are not made again in place: "
                f"ingest the study into a new store (`mbcube run {study} --store NEW`)"
            )
        if self.repairable and self.repaired:
            out.append(f"repaired: the next run redoes {len(self.redo)} item(s); run {rerun}")
        elif self.repairable:
            out.append(f"repair: `mbcube verify {self.store} --repair`, then {rerun}")
        return out


def verify(store: Path | str, *, decode: bool = True, repair_it: bool = False) -> VerifyReport:
    """Check the store (and repair it with `repair_it`); see the module docstring."""
    store = Path(store)
    if not st.store_exists(store):
        st.open_cube(store)  # no cube here: its own error
    st.check_schema(store, st.read_state(store))  # not a cube of this schema: its own error
    lock = st.writer_lock(store) if repair_it else writer_lock_if_writable(store)
    with lock:
        report = VerifyReport(store, check(store, decode=decode))
        if not report.damages:  # the cache is made from the rest: checked when that is sound
            try:
                report.cache = cache_problems(store)
            except Exception as err:  # anything unreadable in it or in what it is made of
                report.cache = [f"{CACHE_GROUP}: cannot be checked ({type(err).__name__}: {err})"]
        report.temporary_files = len(temporary_files(store))
        if repair_it and (not report.ok or report.temporary_files):
            report.redo = repair(store, report.damages)
            if report.cache:
                shutil.rmtree(store / CACHE_GROUP, ignore_errors=True)
                st.consolidate(store)
                report.redo.append(f"aggregate {CACHE_GROUP}")
            report.repaired = True
    return report
