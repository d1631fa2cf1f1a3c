"""Ahead-of-time compilation for TPU slices (`parcae_jax.aot`): slice names, the HLO reading, the
train state it compiles, and one real compile of the tiny config for a v5e-8 (needs libtpu; skipped
without it).

The suite runs with JAX_PLATFORMS=cpu: libtpu's topology description and its compiler do not need the
TPU backend, so the compile runs in this process."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import pytest
from helpers import tiny_parcae

from parcae_jax import aot, aot_analysis, aot_table, flops, sharding, train_step
from parcae_jax.cli_config import load_config
from parcae_jax.errors import ConfigError


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-8", "v6e:2x4", 8),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-32", "v5p:2x2x4", 16),
        ("v5p:2x2x4", "v5p:2x2x4", 16),
    ],
)
def test_slice_names_map_to_libtpu_topologies(name, topology, chips):
    s = aot_analysis.resolve_topology(name)
    assert (s.topology, s.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v9z-8", "v5p-7", "v5e-3", "tpu"])
def test_bad_slice_names_are_config_errors(name):
    with pytest.raises(ConfigError):
        aot_analysis.resolve_topology(name)


def test_bad_topology_is_one_line_exit_2(capsys):
    assert aot.main(["--config", "configs/tiny.py", "--topology", "v9z-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --topology 'v9z-8'") and "\n" not in err


# A module in the optimised-HLO text form: an all-gather in the entry, an all-reduce inside a counted
# loop (`i < 4`, how lax.scan compiles) and one inside a loop whose bound is a run-time value.
_HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0:T(128)} get-tuple-element(%p.1), index=1
  %all-reduce.1 = f32[8]{0:T(128)} all-reduce(%x), replica_groups={}, to_apply=%add
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i.1, %all-reduce.1)
}

%dyn_cond (q: (s32[], bf16[4,2])) -> pred[] {
  %q = (s32[], bf16[4,2]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] get-tuple-element(%q), index=0
  ROOT %lt.1 = pred[] compare(%j, %n), direction=LT
}

%dyn_body (q.1: (s32[], bf16[4,2])) -> (s32[], bf16[4,2]) {
  %q.1 = (s32[], bf16[4,2]{1,0}) parameter(0)
  %y = bf16[4,2]{1,0} get-tuple-element(%q.1), index=1
  %all-reduce.2 = bf16[4,2]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  ROOT %t.1 = (s32[], bf16[4,2]{1,0}) tuple(%j, %all-reduce.2)
}

ENTRY %main (a: f32[2,8], b: (s32[], f32[8])) -> f32[16,8] {
  %a = f32[2,8]{1,0} parameter(0)
  %all-gather-start = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%a), dimensions={0}
  %all-gather-done = f32[16,8]{1,0} all-gather-done(%all-gather-start)
  %b = (s32[], f32[8]{0}) parameter(1)
  %w = (s32[], f32[8]{0}) while(%b), condition=%cond, body=%body
  %w.1 = (s32[], bf16[4,2]{1,0}) while(%b), condition=%dyn_cond, body=%dyn_body
  ROOT %r = f32[16,8]{1,0} copy(%all-gather-done)
}
"""


def test_collective_bytes_count_operands_and_counted_loops():
    c = aot_analysis.collective_bytes(_HLO)
    assert c["all-gather"] == 2 * 8 * 4  # the operand, not the gathered result; the -done not again
    assert c["all-reduce"] == 4 * 8 * 4 + 4 * 2 * 2  # x4 for the counted loop, once for the dynamic one
    assert c["in_dynamic_loops"] == 16 and c["total"] == c["all-gather"] + c["all-reduce"]


def test_out_of_hbm_message_gives_the_sizes():
    msg = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
        "for HLO temporaries (91.08G) exceeds available HBM (15.75G). HLO module: jit_train_step."
    )
    assert aot_analysis.parse_hbm_oom(msg) == (int(91.08 * 2**30), int(15.75 * 2**30), "temporaries")
    msg = "XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 15.78G of 15.75G hbm."
    assert aot_analysis.parse_hbm_oom(msg) == (int(15.78 * 2**30), int(15.75 * 2**30), "total")


def test_abstract_train_state_matches_the_real_one_and_shards_moments():
    """`create_train_state(abstract=True)` (what aot compiles) has the real state's structure, shapes
    and shardings; optimizer moments follow their parameter's FSDP sharding."""
    run = load_config("configs/tiny.py").copy_and_resolve_references()
    run.model = ml_collections.ConfigDict(tiny_parcae().to_dict())  # smaller than tiny: less to compile
    mesh = sharding.make_mesh(2, 4, 1)
    _, real = train_step.create_train_state(run, mesh, max_steps=10)
    _, abstract = train_step.create_train_state(run, mesh, max_steps=10, abstract=True)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (r.shape, r.dtype, r.sharding) == (a.shape, a.dtype, a.sharding)
    params = {tuple(p): x for p, x in jax.tree_util.tree_leaves_with_path(real["params"])}
    mirrored = 0
    for path, x in jax.tree_util.tree_leaves_with_path(real["opt_state"]):
        owner = next((params[tuple(path[i:])] for i in range(len(path)) if tuple(path[i:]) in params), None)
        if owner is not None and owner.shape == x.shape:
            mirrored += 1
            assert x.sharding == owner.sharding, jax.tree_util.keystr(path)
    assert mirrored >= len(params)  # every parameter has at least one moment


def test_a_train_state_larger_than_hbm_is_refused_without_compiling():
    """The micro-batch search spends no compile when the parameters and optimizer state alone exceed a
    chip's HBM (here a v5e chip shrunk to 1 MiB)."""
    pytest.importorskip("libtpu")
    slice_ = aot_analysis.resolve_topology("v5e-8")
    small = dataclasses.replace(slice_, chip=dataclasses.replace(slice_.chip, hbm_bytes=2**20))
    run = load_config("configs/tiny.py")
    logged = []
    best, tried = aot.find_max_micro_batch(run, small, aot.topology_devices(small), 2, log=logged.append)
    assert best is None and list(tried) == [2]
    report = tried[2]
    assert not report.compiled and not report.fits and report.state_bytes > 2**20
    assert "the train state alone" in logged[0] and "not compiled" in logged[0]
    # The real chip holds the tiny state: the check lets the search compile.
    mesh = sharding.make_mesh(devices=aot.topology_devices(slice_))
    assert aot.state_exceeds_hbm(run, slice_, mesh, 2) is None


def test_table_rows_say_where_a_figure_comes_from(tmp_path):
    """A recipe figure is the memory analysis, the compiler's estimate, or the train state alone; the
    table lands between its markers and leaves the rest of the file alone."""
    base = dict(config="configs/x.py", model="m", hbm_gib=16, recipe_micro_batch=8, recipe_remat="off",
                compiles=1, wall_s=10, date="2026-12-04", machine="cpu")
    fits = dict(base, recipe_fits=True, recipe_gib=9.5, recipe_exact=True, topology="v5e-8",
                best=dict(micro_batch=16, remat="off", fsdp=False, gib=14.0, mfu_bound=0.5, limited_by="hbm"))
    refused = dict(base, recipe_fits=False, recipe_gib=40.0, recipe_exact=False, topology="v6e-8", best=None)
    state = dict(refused, recipe_state_only=True, compiles=0, topology="v5p-8")
    text = aot_table.render([fits, refused, state], "cmd", bisect=False)
    rows = [line for line in text.splitlines() if line.startswith("| m |")]
    assert "yes (9.5 / 16)" in rows[0] and "16 (off, recipe mesh; 14.0) | 50% (hbm)" in rows[0]
    assert "no (40.0 / 16, compiler's estimate)" in rows[1] and "| none | - |" in rows[1]
    assert "no (40.0 / 16, train state alone)" in rows[2] and rows[2].endswith("| 0 (10) |")
    doc = tmp_path / "tpu.md"
    doc.write_text(f"before\n{aot_table.START}\nold\n{aot_table.END}\nafter\n")
    aot_table.write_table(str(doc), text)
    assert doc.read_text() == f"before\n{text}\nafter\n"


@pytest.mark.slow
def test_tiny_config_compiles_for_a_v5e_8(tmp_path, capsys):
    pytest.importorskip("libtpu")
    out = tmp_path / "report.json"
    assert aot.main(["--config", "configs/tiny.py", "--topology", "v5e-8", "--json", str(out)]) == 0
    assert "fits" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["chips"] == 8 and report["setup"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    steps = report["steps"]
    assert set(steps) == {"train", "eval", "decode"}
    for step in steps.values():
        assert step["fits"] and 0 < step["memory"]["total"] < step["hbm_bytes"]
        assert step["flops_xla"] > 0 and step["bytes_accessed"] > 0
    train = steps["train"]
    # XLA's count is per device: close to the analytical FLOPs of one device's micro-batch. A program
    # that computed the whole global batch on every device (8x) fails this.
    run = load_config("configs/tiny.py")
    t, s = flops.expected_split(run.model)
    per_device = flops.hardware_flops_per_token(run.model, f=t + s, b=s) * 16 * 128 / 8
    assert train["flops_analytical"] == pytest.approx(per_device)
    assert 0.5 < train["flops_xla"] / per_device < 3
    assert train["collectives"]["all-reduce"] > 0  # the gradient all-reduce of data parallelism
    assert train["roofline"]["seconds"] > 0 and 0 < train["roofline"]["mfu_bound"] <= 1
