"""FineWeb-Edu download against a fake hub folder: file selection, skip-if-complete, partial files, errors."""

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parcae_jax.data import download
from parcae_jax.data.download import DownloadError, download_sample

REPO = "HuggingFaceFW/fineweb-edu"
QUIET = {"log": lambda *_: None, "retry_wait_s": 0.0}


class FakeHub:
    """Serves a local folder laid out like the hub repository; can fail or truncate on purpose."""

    def __init__(self, root):
        self.root = str(root)
        self.downloads: list[str] = []
        self.failures_left = 0
        self.truncate = False

    def list_files(self, repo_id, folder):
        assert repo_id == REPO
        found = {}
        for dirpath, _, names in os.walk(os.path.join(self.root, folder)):
            for name in names:
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, self.root).replace(os.sep, "/")] = os.path.getsize(path)
        return found

    def download(self, repo_id, path, local_dir):
        self.downloads.append(path)
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("connection reset by peer")
        target = os.path.join(local_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(self.root, path), "rb") as src, open(target, "wb") as dst:
            data = src.read()
            dst.write(data[: len(data) // 2] if self.truncate else data)
        return target


def _parquet(path, texts):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)


@pytest.fixture
def hub(tmp_path) -> FakeHub:
    root = tmp_path / "hub"
    for i in range(3):
        _parquet(root / "sample" / "10BT" / f"{i:03d}_00000.parquet", [f"doc {i} {j}" for j in range(50)])
    _parquet(root / "sample" / "100BT" / "000_00000.parquet", ["other sample"])
    _parquet(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", ["not a sample"])
    (root / "sample" / "10BT" / "README.md").write_text("not parquet")
    return FakeHub(root)


def test_selects_the_sample_files_in_order(hub, tmp_path):
    out = tmp_path / "out"
    paths = download_sample("10BT", str(out), client=hub, **QUIET)
    names = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(3)]
    assert paths == [str(out / n) for n in names]
    assert hub.downloads == names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "hub" / name).read_bytes()
    assert not (out / "sample" / "100BT").exists() and not (out / "sample" / "10BT" / "README.md").exists()

    first_two = download_sample("10BT", str(tmp_path / "two"), max_files=2, client=hub, **QUIET)
    assert [os.path.basename(p) for p in first_two] == ["000_00000.parquet", "001_00000.parquet"]


def test_complete_files_are_skipped(hub, tmp_path):
    out = str(tmp_path / "out")
    download_sample("10BT", out, client=hub, **QUIET)
    hub.downloads.clear()
    logs = []
    download_sample("10BT", out, client=hub, log=logs.append, retry_wait_s=0.0)
    assert hub.downloads == []
    assert sum("already complete" in m for m in logs) == 3


def test_partial_files_are_fetched_again(hub, tmp_path):
    out = tmp_path / "out"
    download_sample("10BT", str(out), client=hub, **QUIET)
    truncated = out / "sample" / "10BT" / "001_00000.parquet"
    data = truncated.read_bytes()
    truncated.write_bytes(data[:100])  # an interrupted copy: wrong size
    corrupt = out / "sample" / "10BT" / "002_00000.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"\0" * 8)  # right size, broken parquet footer
    hub.downloads.clear()
    download_sample("10BT", str(out), client=hub, **QUIET)
    assert hub.downloads == ["sample/10BT/001_00000.parquet", "sample/10BT/002_00000.parquet"]
    assert truncated.read_bytes() == data
    assert pq.read_table(corrupt).num_rows == 50


def test_unknown_sample_lists_the_available_ones(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"unknown sample '1BT'.*available samples: 100BT, 10BT"):
        download_sample("1BT", str(tmp_path / "out"), client=hub, **QUIET)
    assert not (tmp_path / "out").exists()


def test_retries_then_gives_up(hub, tmp_path):
    hub.failures_left = 2
    download_sample("10BT", str(tmp_path / "a"), max_files=1, client=hub, retries=3, **QUIET)
    assert len(hub.downloads) == 3

    hub.failures_left = 5
    with pytest.raises(DownloadError, match="download failed 2 times.*connection reset"):
        download_sample("10BT", str(tmp_path / "b"), max_files=1, client=hub, retries=2, **QUIET)

    hub.failures_left, hub.truncate = 0, True
    with pytest.raises(DownloadError, match="incomplete after download"):
        download_sample("10BT", str(tmp_path / "c"), max_files=1, client=hub, retries=2, **QUIET)


def test_cli_prints_the_next_commands(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "HuggingFaceHub", lambda: hub)
    out = str(tmp_path / "cli")
    assert download.main(["fineweb-edu", "--sample", "10BT", "--output", out, "--max-files", "1"]) == 0
    printed = capsys.readouterr().out
    first = os.path.join(out, "sample", "10BT", "000_00000.parquet")
    assert f"python -m parcae_jax.data.tokenizer train --input parquet:{first}" in printed
    assert f"python -m parcae_jax.data.prepare --source 'parquet:{out}/sample/10BT/*.parquet'" in printed
    assert download.main(["fineweb-edu", "--sample", "7BT", "--output", out]) == 2
    assert "unknown sample" in capsys.readouterr().err


def test_real_client_adapter_calls(monkeypatch, tmp_path):
    """The adapter passes the dataset repo type and keeps only files (offline: the hub calls are faked)."""
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    calls = []

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive=False, repo_type=None, **_):
        calls.append((repo_id, path_in_repo, recursive, repo_type))
        return [RepoFolder(path="sample/10BT", oid="t"),
                RepoFile(path="sample/10BT/a.parquet", size=7, oid="b")]

    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, **_):
        calls.append((repo_id, filename, repo_type, local_dir))
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(__file__, target)
        return target

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    client = download.HuggingFaceHub()
    assert client.list_files(REPO, "sample") == {"sample/10BT/a.parquet": 7}
    local = client.download(REPO, "sample/10BT/a.parquet", str(tmp_path))
    assert local == str(tmp_path / "sample" / "10BT" / "a.parquet")
    assert calls == [(REPO, "sample", True, "dataset"),
                     (REPO, "sample/10BT/a.parquet", "dataset", str(tmp_path))]
