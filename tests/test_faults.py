"""Faults and bad inputs, as a hostile but realistic user meets them: one line on stderr naming the
problem and the fix, exit status 2, nothing half-written, no empty workdir (README "Faults and bad
inputs" lists each case and the test that backs it)."""

from __future__ import annotations

import errno
import json
import pathlib

import pytest
from helpers import run_cli, write_token_dataset
from test_train import TINY, finished_steps, small_config, train_argv

from parcae_jax import checkpointing, errors
from parcae_jax.data import prepare, tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("fault_tokens") / "data", vocab_size=256)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def train_main(argv, monkeypatch):
    from parcae_jax.train import main

    return run_cli(main, ["train.py", *argv], monkeypatch)


@pytest.mark.parametrize("extra, message", [
    (["--config.train.tokens_per_param=20"], "clear the others with =None (e.g. --config.train.max_steps"),
    (["--config.model.n_embd=65"], "n_embd 65 is not divisible by num_attention_heads 2"),
    (["--config.data.dataset_dir=/nonexistent/data"], "/nonexistent/data"),
    (["--config.train.lrr=1"], "Valid keys in config.train"),
    (["--config.train.lr=fast"], "bad config override"),
])
def test_train_refuses_bad_input_in_one_line_before_the_workdir_exists(
        dataset, tmp_path, capsys, monkeypatch, extra, message):
    workdir = tmp_path / "run"
    assert train_main([*train_argv(workdir, dataset, "--config.train.max_steps=2"), *extra], monkeypatch) == 2
    assert message in one_line_error(capsys)
    assert not workdir.exists()


def test_train_needs_a_config_file_and_a_workdir(dataset, tmp_path, capsys, monkeypatch):
    assert train_main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")],
                      monkeypatch) == 2
    assert "config file" in one_line_error(capsys) and not (tmp_path / "w").exists()
    assert train_main(["--config", TINY], monkeypatch) == 2
    assert "--workdir DIR is required" in one_line_error(capsys)


def test_debug_shows_the_traceback():
    def main(argv):
        raise errors.ConfigError("bad value")

    assert errors.run(main, []) == 2
    with pytest.raises(errors.ConfigError, match="bad value"):
        errors.run(main, ["--debug"])
    with pytest.raises(KeyError):  # a bug is never turned into one line
        errors.run(lambda argv: {}["x"], [])


def test_disk_errors_are_one_line():
    assert "disk is full" in errors.one_line(OSError(errno.ENOSPC, "No space left on device", "/ckpt/x"))
    assert "/ckpt/x" in errors.one_line(OSError(errno.EROFS, "Read-only file system", "/ckpt/x"))
    assert errors.one_line(OSError(errno.EIO, "I/O error")) is None


def test_a_workdir_that_cannot_be_created_is_refused_before_compiling(dataset, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train_main(train_argv(blocker / "run", dataset, "--config.train.max_steps=2"), monkeypatch) == 2
    assert str(blocker) in one_line_error(capsys)


def test_a_read_only_workdir_is_refused_before_compiling(dataset, tmp_path, capsys, monkeypatch):
    """An existing run folder that cannot be written (a read-only mount; root ignores chmod, so the
    file system's answer is simulated) is refused in one line before any model is built."""
    import errno as errno_

    from etils import epath

    from parcae_jax import train_step

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("")
    real_write = epath.Path.write_text

    def write_text(self, *args, **kwargs):
        if ".write_test" in self.name:
            raise OSError(errno_.EROFS, "Read-only file system", str(self))
        return real_write(self, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the model was built for a run that cannot write its workdir")

    monkeypatch.setattr(type(epath.Path(workdir)), "write_text", write_text)
    monkeypatch.setattr(train_step, "create_train_state", never)
    assert train_main(train_argv(workdir, dataset, "--config.train.max_steps=2"), monkeypatch) == 2
    line = one_line_error(capsys)
    assert str(workdir) in line and "read-only" in line
    assert [p.name for p in workdir.iterdir()] == ["metrics.jsonl"]


def test_other_entry_points_report_bad_input_in_one_line(tmp_path, capsys):
    from parcae_jax import convert, flops, generate
    from parcae_jax.scaling import cli as scaling_cli

    missing = str(tmp_path / "missing")
    cases = [
        (convert.main, ["from-torch", missing, str(tmp_path / "out")], "does not exist"),
        (generate.main, ["--model", missing, "--prompt", "x"], "does not exist"),
        (tokenizer.main, ["train", "--input", missing, "--vocab-size", "300",
                          "--output", str(tmp_path / "t")], "no file matches"),
        (flops.main, ["--config", missing + ".py"], "config file"),
        (scaling_cli.main, ["status", "--root", missing], missing),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, (main, argv)
        assert message in one_line_error(capsys), (main, argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "t").exists()


def test_eval_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    from parcae_jax.eval import main

    code = run_cli(main, ["eval.py", "--config", "configs/eval.py:loss",
                          f"--config.checkpoint={tmp_path / 'missing'}"], monkeypatch)
    assert code == 2 and "does not exist" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------
# Data: invalid UTF-8, damaged shards
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of the corpus, with words" for i in range(400)))
    tokenizer.train_tokenizer([str(corpus)], 300, str(root / "tok"), log=lambda *_: None)
    return str(root / "tok")


def test_a_tokenizer_mismatch_is_one_line_before_the_workdir_exists(
        dataset, text_tokenizer, tmp_path, capsys, monkeypatch):
    argv = train_argv(tmp_path / "run", dataset, "--config.train.max_steps=2",
                      f"--config.data.tokenizer={text_tokenizer}")
    assert train_main(argv, monkeypatch) == 2
    assert "shards were tokenized with tokenizer" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_invalid_utf8_names_file_and_byte_or_is_replaced(tmp_path, text_tokenizer, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    args = ["--source", f"jsonl:{tmp_path}/docs/*.jsonl", "--tokenizer", text_tokenizer, "--output",
            str(tmp_path / "out"), "--workers", "1", "--no-progress", "--val-fraction", "0"]
    assert prepare.main(args) == 2
    line = one_line_error(capsys)
    assert "a.jsonl: invalid UTF-8 at byte 31" in line and "--on-decode-error=replace" in line
    assert not (tmp_path / "out" / "metadata.json").exists()
    assert prepare.main([*args, "--on-decode-error=replace"]) == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["splits"]["train"]["documents"] == 2


def test_a_damaged_shard_is_rebuilt_by_rerunning_preparation(tmp_path, text_tokenizer, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.txt").write_text(f"document {i} " * 50)
    out = tmp_path / "out"
    args = ["--source", f"text:{src}/*.txt", "--tokenizer", text_tokenizer, "--output", str(out),
            "--workers", "1", "--no-progress", "--val-fraction", "0", "--shard-tokens", "200"]
    assert prepare.main(args) == 0
    shard = out / "train" / "shard_00001.tokens"
    good = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated copy
    from parcae_jax.data import shards

    with pytest.raises(shards.ShardError, match="rebuilds damaged shards"):
        shards.open_split(str(out), "train")
    capsys.readouterr()
    assert prepare.main(args) == 0
    assert "damaged shard" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == good
    # Same size, other bytes: only --repair reads every byte.
    flipped = bytearray(good["shard_00002.tokens"])
    flipped[0] ^= 1
    (out / "train" / "shard_00002.tokens").write_bytes(bytes(flipped))
    assert prepare.main(args) == 0 and "already complete" in capsys.readouterr().out
    assert prepare.main([*args, "--repair"]) == 0 and "checksum mismatch" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == good


# ---------------------------------------------------------------------------------------------------
# Checkpoint saves that fail
# ---------------------------------------------------------------------------------------------------


def _no_partial_steps(workdir) -> bool:
    return not [p for p in pathlib.Path(checkpointing.checkpoint_dir(workdir)).iterdir()
                if "tmp" in p.name]


def test_a_full_disk_stops_the_run_at_the_next_save_and_keeps_the_last_checkpoint(
        dataset, tmp_path, monkeypatch):
    import shutil

    from parcae_jax import trainer

    workdir = tmp_path / "run"
    real = shutil.disk_usage

    def disk_usage(path):  # room for the first checkpoint, none for the second
        usage = real(path)
        return usage._replace(free=0) if finished_steps(workdir) else usage

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", disk_usage)
    cfg = small_config(dataset, "train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=100")
    with pytest.raises(checkpointing.CheckpointSaveError, match="last good checkpoint is step 2") as e:
        trainer.train(cfg, str(workdir))
    assert "0.0 MiB free, checkpoint 4 needs about" in str(e.value)
    assert finished_steps(workdir) == [2] and _no_partial_steps(workdir)
    assert (pathlib.Path(checkpointing.checkpoint_dir(workdir)) / "2" / "integrity.json").is_file()


def test_a_failed_asynchronous_save_stops_the_run_at_once(dataset, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from parcae_jax import trainer

    workdir = tmp_path / "run"
    real_save = ocp.CheckpointManager.save
    failing = {}

    def save(self, step, *args, **kwargs):
        if step != 4:
            return real_save(self, step, *args, **kwargs)
        # Step 4's background write fails as on a full disk: part of it written, never finalised.
        partial = pathlib.Path(self.directory) / "4.orbax-checkpoint-tmp-1" / "state"
        partial.mkdir(parents=True)
        (partial / "d").write_bytes(b"half")
        failing["error"] = OSError(errno.ENOSPC, "No space left on device", str(partial / "d"))
        return True

    def check_for_errors(self):
        if "error" in failing:
            raise failing.pop("error")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check_for_errors)
    cfg = small_config(dataset, "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=100")
    with pytest.raises(checkpointing.CheckpointSaveError) as e:
        trainer.train(cfg, str(workdir))
    assert "saving checkpoint 4" in str(e.value) and "disk is full" in str(e.value)
    assert "last good checkpoint is step 2" in str(e.value) and finished_steps(workdir) == [2]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) <= 5  # stopped at the step after the failed save
    assert _no_partial_steps(workdir)


def test_a_step_folder_manifest_finds_deleted_resized_and_changed_files(tmp_path):
    from parcae_jax import integrity

    step = tmp_path / "7"
    (step / "state").mkdir(parents=True)
    (step / "state" / "data").write_bytes(b"x" * 100)
    (step / "meta").mkdir()
    (step / "meta" / "metadata").write_text("{}")
    assert integrity.write_manifest(str(step)) == 102 and integrity.problem(str(step)) is None
    (step / "state" / "data").write_bytes(b"y" * 100)
    assert "checksum mismatch" in integrity.problem(str(step))
    (step / "state" / "data").write_bytes(b"x" * 90)
    assert "has 90 bytes, 100 were written" in integrity.problem(str(step))
    (step / "meta" / "metadata").unlink()
    assert integrity.problem(str(step), ("meta/metadata",)) == "meta/metadata is missing"
