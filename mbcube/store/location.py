"""Where a cube and its results may be written: never over what mbcube did not make.

Each check returns problems as one-line messages (path, what is wrong, the fix), so that a run
can list every problem at once before any pixel work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mbcube.store.lock import LOCK_NAME
from mbcube.store.state import is_cube, read_state, store_exists

#: The file that marks a folder of mbcube's results (written first into a new results folder;
#: it also records what the glacier tables were made from).
RESULTS_MARKER = ".mbcube-tables.json"


def store_problems(store: Path, study_root: Path | None, inputs: Iterable[Path]) -> list[str]:
    """Why the cube at `store` may not be written. An existing cube only needs to be writable;
    a new one may not be created over a file, in a folder holding files that are not an mbcube
    cube (creating the cube would destroy them), inside the study folder or an input's folder,
    or around them."""
    store = Path(store).resolve()
    if store.is_file():
        return [f"{store}: --store is a file, not a folder. Give a new or empty folder."]
    problems = []
    if not is_cube(store):
        others = (
            sorted(p.name for p in store.iterdir() if p.name != LOCK_NAME) if store.is_dir() else []
        )
        if others:
            kind = "a Zarr store mbcube did not make" if store_exists(store) else "files"
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            problems.append(
                f"{store}: --store holds {kind} ({shown}); mbcube creates a cube only in a new "
                "or empty folder and never overwrites what it did not make. Give a path that "
                "does not exist yet (or an empty folder)."
            )
        problems += _overlap_problems(store, "--store", study_root, inputs)
        outer = next((p for p in store.parents if is_cube(p)), None)
        if outer is not None:
            problems.append(
                f"{store}: --store is inside the cube {outer}; a cube inside another would be "
                "taken for part of it. Give a path outside it."
            )
    writable = writable_problem(store, "--store")
    if writable:
        problems.append(writable)
    return problems


def out_problems(
    out: Path, store: Path, study_root: Path | None, inputs: Iterable[Path]
) -> list[str]:
    """Why the results may not be written into `out`: a folder holding files mbcube did not
    write (a cube, e.g. the run's own store, is mbcube's), the study folder or an input's folder
    (a result named like an input, e.g. glaciers.gpkg, would replace it), inside the store, or
    not writable."""
    out = Path(out).resolve()
    store = Path(store).resolve()
    problems = []
    if out.is_dir() and not (out / RESULTS_MARKER).is_file():
        # a cube (this run's store among them) is mbcube's: results may sit beside it
        others = sorted(
            p.name for p in out.iterdir() if p != store and not (p.is_dir() and is_cube(p))
        )
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            problems.append(
                f"{out}: --out holds files mbcube did not write ({shown}); results go into a "
                "new or empty folder, or one mbcube wrote before. Give another --out."
            )
    if out in _protected_folders(study_root, inputs):
        problems.append(
            f"{out}: --out is the study folder or an input's folder; its tables (glaciers.gpkg, "
            "...) could replace the study's files. Give a folder of its own, e.g. --out "
            f"{out.parent / 'results'}."
        )
    if out == store or out.is_relative_to(store):
        problems.append(f"{out}: --out is inside the cube store {store}. Give another folder.")
    writable = writable_problem(out, "--out")
    if writable:
        problems.append(writable)
    return problems


def recorded_study(store: Path) -> tuple[Path | None, list[Path]]:
    """The study folder and static input files recorded in the cube (where its last ingest
    found them), for the checks of commands given only a store (`mbcube aggregate --out`): a
    folder holding other inputs, e.g. the scenes', is refused as holding files mbcube did not
    write."""
    state = read_state(Path(store))
    root = state.get("study", {}).get("root")
    if not root:
        return None, []
    files = [f.get("path") for f in state.get("static_files", {}).values()]
    return Path(root), [Path(root) / f for f in files if f]


def _overlap_problems(
    path: Path, role: str, study_root: Path | None, inputs: Iterable[Path]
) -> list[str]:
    problems = []
    for folder, what in sorted(_protected_folders(study_root, inputs).items()):
        if path == folder or path.is_relative_to(folder):
            problems.append(
                f"{path}: {role} is inside {what} {folder}; the cube must not live among the "
                f"inputs. Put it beside the study, e.g. {role} {folder.parent / 'cube.zarr'}."
            )
            break
        if folder.is_relative_to(path):
            problems.append(
                f"{path}: {role} holds {what} {folder}; writing the cube there could destroy "
                f"it. Give a folder of its own, e.g. {role} {path / 'cube.zarr'}."
            )
            break
    return problems


def _protected_folders(study_root: Path | None, inputs: Iterable[Path]) -> dict[Path, str]:
    """The study folder and the inputs' folders (resolved), each with what it is."""
    folders = {Path(p).resolve().parent: "an input's folder" for p in inputs}
    if study_root is not None:
        folders[Path(study_root).resolve()] = "the study folder"
    return folders


def writable_problem(path: Path, role: str) -> str | None:
    """Why `path` (a folder, existing or to be created) cannot be written, or None."""
    path = Path(path).resolve()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {role} cannot be created: {existing} is a file. Give another path."
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{path}: {role} is on a read-only file system. Give a writable path."
    if existing != path or not path.is_dir():
        ok = os.access(existing, os.W_OK | os.X_OK)
    else:
        try:
            with tempfile.TemporaryFile(dir=path):
                ok = True
        except OSError:
            ok = False
    if not ok:
        return f"{path}: {role} is not writable (permissions of {existing}). Give a writable path."
    return None


def free_bytes(path: Path) -> int:
    """Free space (bytes) of the file system `path` is (or would be created) on."""
    existing = Path(path).resolve()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free
