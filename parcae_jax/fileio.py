"""Small whole files (JSON, metrics, shard records) on local disk or any TensorStore key-value store.

Paths are local paths or kvstore URLs (`gs://bucket/dir/file`, `s3://...`, `file://...`); URLs go
through TensorStore's kvstore, whose GCS driver handles auth and retries without extra packages.
Writes are atomic: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np


def is_remote(path: str | os.PathLike) -> bool:
    """A TensorStore kvstore URL (`gs://`, `s3://`, `file://`, `memory://`): read through TensorStore.
    (`file://` URLs exercise the remote code path on local disk; tests use them.)"""
    return bool(re.match(r"^[a-z0-9+]+://", str(path)))


def _kvstore(url: str):
    import tensorstore as ts

    base, _, key = url.rpartition("/")
    return ts.KvStore.open(base + "/").result(), key


def read_bytes(path: str | os.PathLike, start: int | None = None, stop: int | None = None) -> bytes:
    path = str(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if stop is None else f.read(stop - (start or 0))
    store, key = _kvstore(path)
    result = store.read(key, byte_range=slice(start, stop)).result()
    if result.state == "missing":
        raise FileNotFoundError(path)
    return bytes(result.value)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Local: write a temporary file then rename (never a half-written file under the final name).
    Remote object stores make each object visible only once fully uploaded."""
    path = str(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    store, key = _kvstore(path)
    store.write(key, data).result()


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if not is_remote(path):
        return os.path.exists(path)
    store, key = _kvstore(path)
    return store.read(key, byte_range=slice(0, 0)).result().state != "missing"


def delete(path: str | os.PathLike) -> None:
    """Remove one file or object; a missing one is not an error."""
    path = str(path)
    if not is_remote(path):
        if os.path.lexists(path):
            os.remove(path)
        return
    store, key = _kvstore(path)
    store.write(key, None).result()  # writing None deletes the key


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path).decode())


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps_kw) -> None:
    """`obj` as JSON (`json.dumps` options in `dumps_kw`) plus a final newline, written atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, **dumps_kw) + "\n").encode())


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: string keys, lists for tuples and sets, Python numbers for numpy and JAX
    scalars and arrays, None for NaN/inf (strict JSON has no NaN), str() for anything else."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__"):  # numpy and JAX scalars and arrays
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float):
        return obj
    return str(obj)


@contextlib.contextmanager
def replacing_folder(dst: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Build a local folder atomically: write into the yielded temporary sibling; on success it
    replaces `dst` in one rename, on any error it is removed and `dst` is left as it was."""
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
