"""Download a FineWeb-Edu sample (parquet shards with a `text` column) from the Hugging Face Hub.

    python -m parcae_jax.data.download fineweb-edu --sample 10BT --output data/fineweb-edu [--max-files 2]

Files land under OUTPUT with their repository paths (OUTPUT/sample/10BT/000_00000.parquet, ...). A file
already there is skipped when its size equals the hub's and its parquet footer reads; anything else (an
interrupted copy, a truncated file) is deleted and fetched again, with retries. At the end the commands
to train a tokenizer and prepare shards are printed.

This needs network access to huggingface.co (and, for gated or rate-limited use, `huggingface-cli login`).
It could not be run online where it was written: it is tested against a fake hub folder instead, through
the `HubClient` interface that the real client (`HuggingFaceHub`) also implements.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Protocol

from parcae_jax import errors
from parcae_jax.errors import UserError

DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu"}
SAMPLE_FOLDER = "sample"


class DownloadError(UserError, RuntimeError):
    """The requested files cannot be found or fetched (message says which and what to do)."""


class HubClient(Protocol):
    """What this module needs from a hub: a listing with sizes, and one-file downloads."""

    def list_files(self, repo_id: str, folder: str) -> dict[str, int | None]:
        """{path in repo: size in bytes (None if unknown)} for every file under `folder`, recursively."""

    def download(self, repo_id: str, path: str, local_dir: str) -> str:
        """Fetch `path` to `local_dir/path`; returns the local file path."""


class HuggingFaceHub:
    """The real Hub through `huggingface_hub` (dataset repositories)."""

    def list_files(self, repo_id: str, folder: str) -> dict[str, int | None]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        # list_repo_tree rather than list_repo_files: it also gives sizes, used to spot partial files.
        entries = HfApi().list_repo_tree(repo_id, path_in_repo=folder, recursive=True, repo_type="dataset")
        return {e.path: e.size for e in entries if isinstance(e, RepoFile)}

    def download(self, repo_id: str, path: str, local_dir: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, path, repo_type="dataset", local_dir=local_dir)


def available_samples(files: dict[str, int | None]) -> list[str]:
    """Sample names (`10BT`, `100BT`, ...) that have parquet files in a listing of the sample folder."""
    names = {p.split("/")[1] for p in files if p.startswith(SAMPLE_FOLDER + "/") and p.count("/") >= 2
             and p.endswith(".parquet")}
    return sorted(names)


def select_sample_files(files: dict[str, int | None], sample: str, max_files: int | None = None) -> list[str]:
    """The sorted parquet paths of one sample (the first `max_files` of them)."""
    prefix = f"{SAMPLE_FOLDER}/{sample}/"
    chosen = sorted(p for p in files if p.startswith(prefix) and p.endswith(".parquet"))
    if not chosen:
        raise DownloadError(f"unknown sample {sample!r}: no parquet files under {prefix}; available "
                            f"samples: {', '.join(available_samples(files)) or 'none'}")
    return chosen[:max_files] if max_files else chosen


def is_complete(local_path: str, expected_size: int | None) -> bool:
    """The file has the hub's size (when known) and a readable parquet footer."""
    if not os.path.isfile(local_path):
        return False
    if expected_size is not None and os.path.getsize(local_path) != expected_size:
        return False
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(local_path)
    except Exception:  # pyarrow raises several types for damaged files
        return False
    return True


def download_sample(sample: str, output: str, max_files: int | None = None,
                    repo_id: str = DATASETS["fineweb-edu"], client: HubClient | None = None,
                    retries: int = 3, retry_wait_s: float = 5.0, log=print) -> list[str]:
    """Fetch the parquet files of `sample` into `output`; returns their local paths (sorted)."""
    client = client or HuggingFaceHub()
    listing = client.list_files(repo_id, SAMPLE_FOLDER)
    chosen = select_sample_files(listing, sample, max_files)
    log(f"download: {len(chosen)} files of {repo_id} {SAMPLE_FOLDER}/{sample} -> {output}")
    local_paths = []
    for number, path in enumerate(chosen, start=1):
        local = os.path.join(output, *path.split("/"))
        size = listing.get(path)
        if is_complete(local, size):
            log(f"download: [{number}/{len(chosen)}] {path} already complete, skipped")
        else:
            _fetch(client, repo_id, path, output, local, size, retries, retry_wait_s, log)
            log(f"download: [{number}/{len(chosen)}] {path} done")
        local_paths.append(local)
    return local_paths


def _fetch(client: HubClient, repo_id: str, path: str, output: str, local: str, size: int | None,
           retries: int, retry_wait_s: float, log) -> None:
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        if os.path.lexists(local):
            os.remove(local)  # a partial copy: the hub client could take it for a finished download
        try:
            client.download(repo_id, path, output)
        except Exception as err:  # network errors come in many types; all are worth a retry
            last_error = err
        else:
            if is_complete(local, size):
                return
            last_error = DownloadError(f"{local}: incomplete after download (size or parquet footer wrong)")
        if attempt < retries:
            wait = retry_wait_s * 2 ** (attempt - 1)
            log(f"download: {path} failed ({last_error}); retry {attempt}/{retries - 1} in {wait:.0f} s")
            time.sleep(wait)
    raise DownloadError(f"{repo_id}/{path}: download failed {retries} times ({last_error}); check the "
                        "network or `huggingface-cli login`, then re-run (finished files are kept)")


def next_steps(output: str, sample: str, first_file: str, vocab_size: int = 32768) -> str:
    """The commands that turn the downloaded parquet files into a tokenizer and token shards. The tokenizer
    trains on the first file only: one FineWeb-Edu file holds billions of characters, far more than the
    200M-character training sample needs, and reading every file just to sample them would take long."""
    source = f"parquet:{os.path.join(output, SAMPLE_FOLDER, sample)}/*.parquet"
    tokenizer_dir = os.path.join(output, f"tokenizer-{vocab_size}")
    data_dir = os.path.join(output, f"shards-{sample}-{vocab_size}")
    train = ["python", "-m", "parcae_jax.data.tokenizer", "train", "--input", f"parquet:{first_file}",
             "--vocab-size", str(vocab_size), "--output", tokenizer_dir]
    prepare = ["python", "-m", "parcae_jax.data.prepare", "--source", source, "--tokenizer", tokenizer_dir,
               "--output", data_dir, "--val-fraction", "0.01"]
    return shlex.join(train) + "\n" + shlex.join(prepare)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.data.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--sample", default="10BT", help="sample folder name (10BT, 100BT, 350BT)")
    parser.add_argument("--output", required=True, help="local folder for the parquet files")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N files (sorted)")
    parser.add_argument("--repo-id", default=None, help="dataset repository (default: the official one)")
    args = parser.parse_args(argv)
    repo_id = args.repo_id or DATASETS[args.dataset]
    paths = download_sample(args.sample, args.output, args.max_files, repo_id)
    steps = next_steps(args.output, args.sample, paths[0])
    print(f"next: train a tokenizer (or reuse one) and prepare token shards:\n{steps}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
