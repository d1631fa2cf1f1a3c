"""Folder manifests: every file's size and CRC-32, recorded once a folder is complete and checked
before it is trusted (checkpoint steps; shards record theirs in their own JSON).

Why not rely on the writer (Orbax) alone: its atomic rename protects against a crash *during* a save,
not against what happens to the files afterwards (a truncated copy, a deleted file, a bad disk). A
size check costs one stat per file; the CRC reads every byte once (about 1 GB/s), which is cheap next
to restoring the same bytes.
"""

from __future__ import annotations

import zlib

from etils import epath

from parcae_jax import fileio

MANIFEST = "integrity.json"
_CHUNK = 1 << 22


def crc32_hex(data: bytes, crc: int = 0) -> str:
    """CRC-32 of `data` (continuing `crc`) as 8 hex digits: the checksum every manifest records."""
    return f"{zlib.crc32(data, crc):08x}"


def crc32_of(path: epath.Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc32_hex(b"", crc)


def _files(folder: epath.Path) -> list[epath.Path]:
    """Every file below `folder` (epath has no recursive glob on object stores, so walk it)."""
    found, pending = [], [folder]
    while pending:
        for path in pending.pop().iterdir():
            if path.is_dir():
                pending.append(path)
            elif path.name != MANIFEST:
                found.append(path)
    return sorted(found)


def write_manifest(folder: str) -> int:
    """Record every file under `folder` in `folder/integrity.json`; returns the folder's total bytes.
    Object stores get sizes only (a checksum there would download the whole checkpoint)."""
    root = epath.Path(folder)
    with_crc = not fileio.is_remote(folder)
    files = {}
    for path in _files(root):
        entry = {"size": path.stat().length}
        if with_crc:
            entry["crc32"] = crc32_of(path)
        files[str(path.relative_to(root))] = entry
    fileio.write_json_atomic(str(root / MANIFEST), {"files": files}, sort_keys=True)
    return sum(e["size"] for e in files.values())


def total_size(folder: str) -> int | None:
    """The bytes a manifest records (None without one)."""
    path = epath.Path(folder) / MANIFEST
    if not path.exists():
        return None
    return sum(e["size"] for e in fileio.read_json(str(path))["files"].values())


def problem(folder: str, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `folder` (a missing required file, a file missing, resized or changed since
    its manifest was written), or None when it is intact. Without a manifest only `required` is checked."""
    root = epath.Path(folder)
    for name in required:
        if not (root / name).exists():
            return f"{name} is missing"
    manifest = root / MANIFEST
    if not manifest.exists():
        return None
    for name, entry in fileio.read_json(str(manifest))["files"].items():
        path = root / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().length
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if "crc32" in entry and crc32_of(path) != entry["crc32"]:
            return f"{name} has changed since it was written (checksum mismatch)"
    return None
