"""Integrity of a store: is every file a step recorded still there, of its size, and readable?

Each step record lists the files the step wrote (`records.list_outputs`). `check` compares them
with the store as it is (a file missing, or of another size) and, with `decode`, reads every
recorded chunk through zarr, whose CRC-32C codec (`cube.checked_codecs`) refuses a chunk whose
bytes changed; every metadata document (`zarr.json`) must parse, every record and scene flag
must decode, and the flags must agree with the records (a scene flagged ingested or binned
without its record). Nothing here trusts what it reads: a damaged record or flag is reported,
never raised.

`repair` forgets the records of what is damaged (and clears those flags), so that the next run
redoes exactly that and what depends on it. A node whose metadata is damaged is deleted when a
step makes it again (the layers, groups and records of the steps, the scenes' input layers),
with the records of everything it held; the static layers, coordinates and the root cannot be
made again in place (the study is ingested into a new store). zarr's temporary files left by a
kill are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mbcube.store import records
from mbcube.store.cube import SCENE_INGESTED, SCENE_PENDING, consolidate, scene_index
from mbcube.store.records import RECORDS_GROUP, STATIC_ITEM, TEMPORARY_SUFFIX, WHOLE

#: Chunks decoded at once (threads: zarr's codecs release the GIL in their C code).
DECODE_THREADS = 4
#: The pseudo-step of damage that `repair` cannot mend in place (a new store is needed).
NEW_STORE = "new store"
#: Store groups a step makes whole (deleted and made again when their metadata is damaged).
DERIVED_GROUPS = ("stats", "hypsometry", "penetration", "massbalance_cache")


@dataclass(frozen=True)
class Damage:
    """One damaged item: the step and item (scene id, or a whole-store item starting with
    "_") whose record lists it, what is wrong, and with which file."""

    step: str
    item: str
    path: str  #: store-relative path of the damaged file or node
    problem: str  #: 'missing', 'size N, recorded M', 'does not decode: ...', ...

    def line(self) -> str:
        if self.step == NEW_STORE:
            return f"{self.path}: {self.problem} (not made again in place)"
        if self.step in (NODE, FLAGS, "metadata", CONSOLIDATED, SCENE_COORD):
            return f"{self.path}: {self.problem} (made again by the next run after --repair)"
        what = f"scene {self.item}" if not self.item.startswith(WHOLE) else self.item[1:]
        return f"{self.path}: {self.problem} (written by step '{self.step}' for {what})"


def check(store: Path, decode: bool = True) -> list[Damage]:
    """Every damaged item of the store: metadata that does not parse; records and flags that do
    not decode; recorded files missing, resized or (with `decode`) not decodable; scene flags
    without their records."""
    store = Path(store)
    found = _metadata_damage(store)
    unreadable = {d.path for d in found}
    found += _consolidated_damage(store, unreadable)
    try:
        scene_index(store)
    except Exception as err:  # the scene ids: every record is found by them
        problem = f"the scene ids do not decode ({type(err).__name__}: {err})"
        return [*found, Damage(NEW_STORE, WHOLE + "store", "scene/c/0", problem)]
    found += _record_damage(store)
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
    if decode:
        found += _unrecorded_damage(store, _recorded_files(store) | unreadable)
    return found


def repair(store: Path, damages: list[Damage]) -> list[str]:
    """Forget the records of the damaged items (and clear their scenes' flags: an ingest to
    redo is pending, a binning to redo is not binned), delete damaged derived nodes (see the
    module docstring), and remove zarr's temporary files left by a kill. Returns what the next
    run will redo, as "step item"."""
    store = Path(store)
    damages = damages + _deleted_nodes(store, [d for d in damages if d.step == "metadata"])
    damages = damages + _deleted_nodes(store, [d for d in damages if d.step == NODE])
    index = _safe_scene_index(store)
    coords = [d for d in damages if d.step == SCENE_COORD]
    for damage in coords:
        (store / damage.path).unlink(missing_ok=True)
    if coords:  # every scene is ingested again (its coordinates with it)
        damages = damages + [Damage("ingest", s, "scene coordinates", "") for s in index]
    redo = []
    flags = {d.path for d in damages if d.step == FLAGS}
    for step, item in sorted({(d.step, d.item) for d in damages if d.step not in _NOT_RECORDS}):
        records.invalidate(store, step, item)
        if item in index and step == "ingest" and "scene_state" not in flags:
            _set_flag(store / "scene_state", index[item], SCENE_PENDING)
        if item in index and step == "bin" and "stats/binned" not in flags:
            _set_flag(store / "stats" / "binned", index[item], 0)
        redo.append(f"{step} {item}")
    for damage in damages:
        if damage.step == "records":  # a record that does not decode: forgotten
            (store / damage.path).unlink(missing_ok=True)
            redo.append(f"{damage.path.split('/')[1]} {damage.item}")
    for flag in sorted({d.path for d in damages if d.step == FLAGS}):
        _rewrite_flags(store, flag, index)
    for path in temporary_files(store):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):  # metadata left damaged: a new store
        consolidate(store)
    return redo


def temporary_files(store: Path) -> list[Path]:
    """zarr's temporary files (written, then renamed into place) left behind by a kill."""
    found = []
    for folder, _, names in os.walk(store):
        found += [Path(folder) / n for n in names if n.endswith(TEMPORARY_SUFFIX)]
    return found


#: Damage to a flag array (FLAG_ARRAYS), rewritten from the records.
FLAGS = "flags"
FLAG_ARRAYS = ("scene_state", "stats/binned")
#: Damage to a chunk no record lists (coordinates, a group's coordinates): its node is made
#: again where a step makes it (like damaged metadata), else a new store is needed.
NODE = "node"
#: Damage to the root's consolidated metadata: written again from the nodes' own documents.
CONSOLIDATED = "consolidated"
#: Damage to a chunk of the scenes' coordinates taken from their rows (SCENE_COORDS): the chunk
#: is deleted and every scene ingested again.
SCENE_COORD = "scene coordinates"
SCENE_COORDS = (
    "scene_date",
    "scene_month",
    "scene_years",
    "scene_kind",
    "scene_nlooks",
    "scene_h_amb_m",
)
#: Damage entries that are not a step's record of an item.
_NOT_RECORDS = ("metadata", "records", FLAGS, NODE, NEW_STORE, CONSOLIDATED, SCENE_COORD)


def _all_records(store: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    try:
        whole = records.whole_records(store)
    except Exception:  # the records group's metadata: reported by _metadata_damage
        whole = {}
    for key, record in sorted(whole.items()):
        step, item = key.split("/", 1)
        yield step, item, record
    for step in records.steps_recorded(store):
        for item, record in sorted(_quietly(records.step_records, store, step, {}).items()):
            yield step, item, record


def _quietly(func: Any, store: Path, step: str, default: Any) -> Any:
    try:
        return func(store, step)
    except Exception:  # its metadata is damaged: reported by _metadata_damage
        return default


def _record_damage(store: Path) -> list[Damage]:
    """Records whose chunk does not decode or parse."""
    ids = {i: s for s, i in _safe_scene_index(store).items()}
    found = []
    for step in records.steps_recorded(store):
        for i in _quietly(records.damaged_records, store, step, []):
            path = f"{RECORDS_GROUP}/{step}/c/{i}"
            found.append(Damage("records", ids.get(i, str(i)), path, "record does not decode"))
    return found


def _metadata_damage(store: Path) -> list[Damage]:
    """Metadata documents that do not parse as JSON (the node is unreadable)."""
    found = []
    for folder, _, names in os.walk(store):
        if "zarr.json" not in names:
            continue
        path = Path(folder) / "zarr.json"
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            relative = path.relative_to(store).as_posix()
            node = Path(relative).parent.as_posix()
            step = "metadata" if _remade_node(store, node) is not None else NEW_STORE
            found.append(Damage(step, WHOLE + "store", relative, f"does not parse: {err}"))
    return found


#: Nodes whose attributes change without the root's consolidated copy being rewritten (the
#: records, the cache's remembered key facts): their copies are not compared.
UNCONSOLIDATED = (RECORDS_GROUP, "massbalance_cache")


def _consolidated_damage(store: Path, unreadable: set[str]) -> list[Damage]:
    """The root's consolidated copy of the nodes' metadata (what `xr.open_zarr` reads) where it
    differs from the nodes' own documents: `repair` writes it again from them."""
    try:
        copies = json.loads((store / "zarr.json").read_bytes())["consolidated_metadata"]
        copies = copies["metadata"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [Damage(CONSOLIDATED, WHOLE + "store", "zarr.json", f"no consolidated copy: {err}")]
    found = []
    for node, copy in sorted(copies.items()):
        if node.split("/")[0] in UNCONSOLIDATED or f"{node}/zarr.json" in unreadable:
            continue
        try:
            own = json.loads((store / node / "zarr.json").read_bytes())
        except (OSError, ValueError):
            own = None
        if isinstance(own, dict) and isinstance(copy, dict):  # a group's own consolidated copy
            own.pop("consolidated_metadata", None)  # of its members is not in the root's
            copy = {k: v for k, v in copy.items() if k != "consolidated_metadata"}
        if own != copy:
            problem = f"the root's consolidated copy of {node}'s metadata differs from its own"
            found.append(Damage(CONSOLIDATED, WHOLE + "store", "zarr.json", problem))
    return found


def _deleted_nodes(store: Path, metadata: list[Damage]) -> list[Damage]:
    """Delete the nodes whose metadata is damaged (and a step makes again); return the records
    of what they held, to forget."""
    found = []
    for damage in metadata:
        if damage.step == NODE:  # a chunk: its array
            node = _chunk_of(damage.path)[0] or damage.path
        else:  # a metadata document: its node
            node = Path(damage.path).parent.as_posix()
        target = _remade_node(store, node)
        if target is None:
            continue
        for step, item, record in list(_all_records(store)):
            prefixes = record.get("outputs", {})
            if any(p == target or p.startswith(target + "/") for p in prefixes):
                found.append(Damage(step, item, target, "deleted: its metadata was damaged"))
        if target == RECORDS_GROUP:
            (store / target / "zarr.json").unlink(missing_ok=True)  # whole-store records
        else:
            shutil.rmtree(store / target, ignore_errors=True)
    return found


def _remade_node(store: Path, node: str) -> str | None:
    """The node to delete so that a step makes it again, for damaged metadata at `node` (a
    store-relative folder); None when no step does (root, static layers, coordinates)."""
    parts = node.split("/")
    if node in ("", "."):
        return None
    if parts[0] == RECORDS_GROUP:
        return "/".join(parts[:2])
    if parts[0] in DERIVED_GROUPS:
        return parts[0]
    if parts[0] == "outliers" and len(parts) >= 2:
        return "/".join(parts[:2])
    static = records.step_record(store, "ingest", STATIC_ITEM).get("outputs", {})
    if f"{parts[0]}/c" in static or parts[0] in ("scene", "x", "y", "spatial_ref"):
        return None
    if parts[0].startswith("scene_") or parts[0] == "outliers":
        return None
    return parts[0]  # a per-scene layer: the ingest's, or a step's output


def _recorded_files(store: Path) -> set[str]:
    """Every store-relative file some record lists."""
    found = set()
    for _, _, record in _all_records(store):
        for prefix, files in record.get("outputs", {}).items():
            found |= {f"{prefix}/{name}" if name else prefix for name in files}
    return found


def _unrecorded_damage(store: Path, recorded: set[str]) -> list[Damage]:
    """Chunks no record lists (coordinates, scene flags and ids, groups' coordinates) that do
    not decode."""
    found = []
    for folder, dirs, names in os.walk(store):
        dirs[:] = [d for d in dirs if d != RECORDS_GROUP or Path(folder) != store]
        if "zarr.json" not in names or not (Path(folder) / "c").exists():
            continue
        array = Path(folder).relative_to(store).as_posix()
        if f"{array}/zarr.json" in recorded or array in FLAG_ARRAYS:
            continue  # unreadable metadata, or flags: reported once, by their own checks
        manifest = {f"{array}/c": list_chunk_files(store, f"{array}/c", recorded)}
        if not manifest[f"{array}/c"]:
            continue
        for damage in _decode_damage(store, NODE, WHOLE + "store", manifest, set()):
            if array in SCENE_COORDS:  # written again by the ingest of every scene
                found.append(Damage(SCENE_COORD, WHOLE + "store", damage.path, damage.problem))
                continue
            step = NODE if _remade_node(store, array) is not None else NEW_STORE
            found.append(Damage(step, damage.item, damage.path, damage.problem))
    return found


def list_chunk_files(store: Path, prefix: str, skip: set[str]) -> dict[str, int]:
    """The chunk files under `prefix` (store-relative) that are not in `skip`, with sizes."""
    root = store / prefix
    if root.is_file():
        return {} if prefix in skip else {"": root.stat().st_size}
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = Path(folder) / name
            name_in = full.relative_to(root).as_posix()
            if f"{prefix}/{name_in}" not in skip and not name.endswith(TEMPORARY_SUFFIX):
                found[name_in] = full.stat().st_size
    return found


def _decode_damage(
    store: Path, step: str, item: str, manifest: dict[str, dict[str, int]], skip: set[str]
) -> list[Damage]:
    """Recorded chunks that zarr cannot decode (checksum, codec)."""
    chunks: list[tuple[str, str, tuple[int, ...]]] = []
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

    found = []
    for path, array, _ in chunks:
        if array not in arrays:
            try:
                arrays[array] = zarr.open_array(str(store / array), mode="r")
            except Exception as err:  # its metadata is damaged: reported by _metadata_damage
                found.append(Damage(step, item, path, f"its array does not open: {err}"))
    chunks = [c for c in chunks if c[1] in arrays]
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
    """Scene flags that do not decode, scenes flagged ingested without an ingest record, or
    binned without a bin record."""
    found = []
    ingested = _quietly(records.step_records, store, "ingest", {})
    binned_ok = _quietly(records.step_records, store, "bin", {})
    undecodable: set[str] = set()
    for scene_id, i in _safe_scene_index(store).items():
        for flag, step, ok, done in (
            ("scene_state", "ingest", ingested, SCENE_INGESTED),
            ("stats/binned", "bin", binned_ok, 1),
        ):
            if flag in undecodable:
                continue
            try:
                value = _flag(store / flag, i)
            except Exception as err:  # zarr's checksum or codec error
                found.append(Damage(FLAGS, WHOLE + flag, flag, f"does not decode: {err}"))
                undecodable.add(flag)
                continue
            if value == done and scene_id not in ok:
                found.append(Damage(step, scene_id, flag, f"flag {done} without a record"))
    return found


def _safe_scene_index(store: Path) -> dict[str, int]:
    try:
        return scene_index(store)
    except Exception:  # the scene coordinate is damaged: reported by the other checks
        return {}


def _flag(path: Path, index: int) -> int | None:
    """One scene's flag (None when the flag array does not exist or is shorter)."""
    if not (path / "zarr.json").is_file():
        return None
    array = zarr.open_array(str(path), mode="r")
    return int(np.asarray(array[index])) if index < array.shape[0] else None


def _rewrite_flags(store: Path, flag: str, index: dict[str, int]) -> None:
    """Write a whole flag array (its chunks do not decode) again from the records: a scene is
    ingested (binned) when it has an ingest (bin) record, else pending (not binned); a scene
    removed from the study is flagged removed again by the next ingest."""
    step, done = ("ingest", SCENE_INGESTED) if flag == "scene_state" else ("bin", 1)
    have = records.step_records(store, step)
    array = zarr.open_array(str(store / flag), mode="r+")
    values = [0] * array.shape[0]
    for scene_id, i in index.items():
        if i < len(values) and scene_id in have:
            values[i] = done
    array[:] = values


def _set_flag(path: Path, index: int, value: int) -> None:
    if not (path / "zarr.json").is_file():
        return
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
