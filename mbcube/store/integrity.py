"""Integrity of a store: is every file a step recorded still there, of its size, and readable?

Each step record lists the files the step wrote (`records.list_outputs`). `check` compares them
with the store as it is (a file missing, or of another size) and, with `decode`, reads every
recorded chunk through zarr, whose CRC-32C codec (`cube.checked_codecs`) refuses a chunk whose
bytes changed; every metadata document (`zarr.json`) must parse. It also checks the flags the
steps keep beside their records (a scene flagged ingested or binned without its record).
`repair` forgets the records of what is damaged (and clears those flags), so that the next run
redoes exactly that and what depends on it; zarr's temporary files left by a kill are removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mbcube.store import records
from mbcube.store.cube import SCENE_INGESTED, SCENE_PENDING, scene_index, scene_states
from mbcube.store.records import TEMPORARY_SUFFIX, WHOLE

#: Chunks decoded at once (threads: zarr's codecs release the GIL in their C code).
DECODE_THREADS = 4


@dataclass(frozen=True)
class Damage:
    """One damaged item: the step and item (scene id, or a whole-store item starting with
    "_") whose record lists it, what is wrong, and with which file."""

    step: str
    item: str
    path: str  #: store-relative path of the damaged file or node
    problem: str  #: 'missing', 'size N, recorded M', 'does not decode: ...', ...

    def line(self) -> str:
        what = f"scene {self.item}" if not self.item.startswith(WHOLE) else self.item[1:]
        return f"{self.path}: {self.problem} (written by step '{self.step}' for {what})"


def check(store: Path, decode: bool = True) -> list[Damage]:
    """Every damaged item of the store: recorded files missing, resized or (with `decode`) not
    decodable; metadata documents that do not parse; scene flags without their records."""
    store = Path(store)
    found = _metadata_damage(store)
    unreadable = {d.path for d in found}
    for step, item, record in _all_records(store):
        manifest = record.get("outputs", {})
        damaged = records.damaged_outputs(store, manifest)
        for path in damaged:
            size = _size(store / path)
            problem = (
                "missing"
                if size is None
                else f"size {size} bytes, recorded {_recorded(manifest, path)}"
            )
            found.append(Damage(step, item, path, problem))
        if decode:
            found += _decode_damage(store, step, item, manifest, unreadable | set(damaged))
    found += _flag_damage(store)
    return found


def repair(store: Path, damages: list[Damage]) -> list[str]:
    """Forget the records of the damaged items (and clear their scenes' flags: an ingest to
    redo is pending, a binning to redo is not binned), and remove zarr's temporary files left
    by a kill. Returns what the next run will redo, as "step item"."""
    store = Path(store)
    index = scene_index(store) if (store / "scene").is_dir() else {}
    redo = []
    for step, item in sorted({(d.step, d.item) for d in damages if d.step != METADATA}):
        records.invalidate(store, step, item)
        if item in index and step == "ingest":
            _set_flag(store / "scene_state", index[item], SCENE_PENDING)
        if item in index and step == "bin" and (store / "stats" / "binned").is_dir():
            _set_flag(store / "stats" / "binned", index[item], 0)
        redo.append(f"{step} {item}")
    for path in temporary_files(store):
        path.unlink(missing_ok=True)
    return redo


def temporary_files(store: Path) -> list[Path]:
    """zarr's temporary files (written, then renamed into place) left behind by a kill."""
    found = []
    for folder, _, names in os.walk(store):
        found += [Path(folder) / n for n in names if n.endswith(TEMPORARY_SUFFIX)]
    return found


def _all_records(store: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for key, record in sorted(records.whole_records(store).items()):
        step, item = key.split("/", 1)
        yield step, item, record
    for step in records.steps_recorded(store):
        for item, record in sorted(records.step_records(store, step).items()):
            yield step, item, record


#: The pseudo-step of damaged metadata: not repaired in place (`repair` leaves it).
METADATA = "metadata"


def _metadata_damage(store: Path) -> list[Damage]:
    """Metadata documents that do not parse as JSON (the node is unreadable; mbcube does not
    rebuild a node's metadata in place: the study is ingested into a new store)."""
    found = []
    for folder, _, names in os.walk(store):
        if "zarr.json" not in names:
            continue
        path = Path(folder) / "zarr.json"
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            relative = path.relative_to(store).as_posix()
            found.append(Damage(METADATA, WHOLE + "store", relative, f"does not parse: {err}"))
    return found


def _decode_damage(
    store: Path, step: str, item: str, manifest: dict[str, dict[str, int]], skip: set[str]
) -> list[Damage]:
    """Recorded chunks that zarr cannot decode (checksum, codec) and metadata that does not
    parse."""
    chunks: list[tuple[str, str, tuple[int, ...]]] = []
    found = []
    for prefix, files in manifest.items():
        for name in files:
            path = f"{prefix}/{name}" if name else prefix
            if not (store / path).is_file():
                continue  # reported as missing
            array, key = _chunk_of(path)
            if array is None:
                continue  # a metadata document: checked by _metadata_damage
            if path in skip or f"{array}/zarr.json" in skip:
                continue
            chunks.append((path, array, key))
    arrays: dict[str, Any] = {}
    for _, array, _ in chunks:
        if array not in arrays:
            arrays[array] = zarr.open_array(str(store / array), mode="r")

    def decode(job: tuple[str, str, tuple[int, ...]]) -> Damage | None:
        path, array, key = job
        try:
            block = arrays[array]
            if key:
                block.get_block_selection(key)
            else:
                block[...]
        except Exception as err:  # zarr and its codecs raise several types for bad bytes
            return Damage(step, item, path, f"does not decode: {type(err).__name__}: {err}")
        return None

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        found += [d for d in pool.map(decode, chunks) if d is not None]
    return found


def _chunk_of(path: str) -> tuple[str | None, tuple[int, ...]]:
    """(array path, chunk coordinates) of a store-relative chunk file path, (None, ()) for
    anything else (e.g. a zarr.json)."""
    parts = path.split("/")
    if "c" not in parts:
        return None, ()
    at = len(parts) - 1 - parts[::-1].index("c")
    coords = parts[at + 1 :]
    if not all(c.isdigit() for c in coords):
        return None, ()
    return "/".join(parts[:at]), tuple(int(c) for c in coords)


def _flag_damage(store: Path) -> list[Damage]:
    """Scenes flagged ingested without an ingest record, or binned without a bin record."""
    if not (store / "scene_state").is_dir():
        return []
    found = []
    ingested = records.step_records(store, "ingest")
    binned_ok = records.step_records(store, "bin")
    states = scene_states(store)
    binned = _flags(store / "stats" / "binned")
    for scene_id, i in scene_index(store).items():
        if states[i] == SCENE_INGESTED and scene_id not in ingested:
            found.append(Damage("ingest", scene_id, "scene_state", "ingested without a record"))
        if binned is not None and i < len(binned) and binned[i] == 1 and scene_id not in binned_ok:
            found.append(Damage("bin", scene_id, "stats/binned", "binned without a record"))
    return found


def _flags(path: Path) -> np.ndarray | None:
    if not (path / "zarr.json").is_file():
        return None
    return np.asarray(zarr.open_array(str(path), mode="r")[:])


def _set_flag(path: Path, index: int, value: int) -> None:
    array = zarr.open_array(str(path), mode="r+")
    if index < array.shape[0]:
        array[index] = value


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _recorded(manifest: dict[str, dict[str, int]], path: str) -> int | None:
    for prefix, files in manifest.items():
        for name, size in files.items():
            if (f"{prefix}/{name}" if name else prefix) == path:
                return size
    return None
