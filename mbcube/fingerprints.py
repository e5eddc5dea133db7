"""What identifies an input file: its path relative to the study folder and its content.

A fingerprint is {"path": relative path (POSIX), "size": bytes, "sha256": hex digest,
"mtime_ns": modification time}. Two fingerprints name the same input when path, size and
digest agree (`same_input`): a study folder that was moved, renamed or copied still matches,
and an edited file does not, whatever its modification time says. The digest of a file whose
size and modification time are those recorded is taken from the record instead of reading the
file again (the way git's index and make trust an unchanged stat), so an up-to-date run reads
no input.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Fingerprint = dict[str, Any]
_IDENTITY = ("path", "size", "sha256")


def fingerprint(path: Path, root: Path, known: Mapping[str, Any] | None = None) -> Fingerprint:
    """The fingerprint of the file `path` relative to the study folder `root`; `known`: the
    fingerprint recorded before, whose digest is reused when path, size and mtime still agree."""
    stat = path.stat()
    relative = Path(os.path.relpath(path.resolve(), Path(root).resolve())).as_posix()
    found: Fingerprint = {"path": relative, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and all(known.get(k) == found[k] for k in found) and known.get("sha256"):
        found["sha256"] = known["sha256"]
    else:
        with open(path, "rb") as f:
            found["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return found


def fingerprints(
    files: Mapping[str, Path], root: Path, known: Mapping[str, Any] | None = None
) -> dict[str, Fingerprint]:
    """Fingerprints of several files by role (`known`: the recorded ones, by role)."""
    known = known or {}
    return {role: fingerprint(p, root, known.get(role)) for role, p in files.items()}


def same_input(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Both fingerprints name the same file content at the same place in the study."""
    if not a or not b:
        return a == b
    return all(a.get(k) == b.get(k) for k in _IDENTITY)


def same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same roles, each with the same input (`same_input`)."""
    return set(a) == set(b) and all(same_input(a[k], b[k]) for k in a)


def changed_roles(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The roles whose input differs between two sets of fingerprints."""
    return sorted(k for k in set(a) | set(b) if not same_input(a.get(k), b.get(k)))


def identity(prints: Mapping[str, Fingerprint]) -> dict[str, dict[str, Any]]:
    """The part of fingerprints that names the content (for tokens: no modification times)."""
    return {role: {k: fp.get(k) for k in _IDENTITY} for role, fp in prints.items()}
