"""`metrics.jsonl` on object stores: rows are uploaded in batches, not one upload per row."""

from __future__ import annotations

from parcae_jax import fileio, metrics


def test_object_store_metrics_upload_in_batches(tmp_path, monkeypatch):
    uploads = []
    real_write = fileio.write_bytes_atomic

    def counting_write(path, data):
        uploads.append(data.decode().count("\n"))  # rows in each upload
        real_write(path, data)

    monkeypatch.setattr(fileio, "write_bytes_atomic", counting_write)
    workdir = f"file://{tmp_path}"  # a URL: the object-store code path, on local disk
    writer = metrics.MetricsWriter(workdir)
    for step in range(1, 101):
        writer.write({"step": step, "loss": 1.0})
    assert uploads == [0]  # the (empty) file at start; 100 rows within the interval wait in memory
    writer.flush()  # before a checkpoint
    writer.write({"step": 101, "loss": 1.0})
    writer.close()
    assert uploads == [0, 100, 101]
    assert [r["step"] for r in metrics.read_metrics(workdir)] == list(range(1, 102))

    uploads.clear()
    writer = metrics.MetricsWriter(workdir, resume_step=50)  # drops steps 51-101 at once
    for step in (51, 52):
        writer.write({"step": step, "loss": 2.0})
    writer.close()
    assert uploads == [50, 52]
    assert [r["step"] for r in metrics.read_metrics(workdir)] == list(range(1, 53))
