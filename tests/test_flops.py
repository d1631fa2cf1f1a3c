"""Parameter counts, FLOPs per token, training budgets and the config CLI (PARCAE_SPEC §3.5, §7.2, §10)."""

import math
import pathlib

import ml_collections
import pytest

from parcae_jax import flops, presets
from parcae_jax.cli_config import UnknownConfigKeyError, load_config, split_config_args

REPO = pathlib.Path(__file__).resolve().parent.parent


def config_file(name: str) -> str:
    return str(REPO / "configs" / f"{name}.py")


# Spec §3.5 (unique parameters, wte, value-embedding tables, core block) and §10 (FLOPs/token, T=2048).
RELEASED = {
    "parcae-small-140m": (144_323_136, 25_165_824, 75_497_472, 14_159_040, 1_359_902_976),
    "parcae-medium-370m": (388_003_328, 33_554_432, 201_326_592, 50_340_352, 4_173_740_032),
    "parcae-large-770m": (776_655_680, 41_943_040, 377_487_360, 117_981_120, 8_859_905_280),
    "parcae-xlarge-1_3b": (1_338_591_744, 50_331_648, 603_979_776, 226_518_528, 15_833_634_816),
    "gpt-small-140m": (143_141_184, 25_165_824, 75_497_472, 0, 821_098_368),
    "gpt-medium-370m": (385_903_104, 33_554_432, 201_326_592, 0, 2_416_081_920),
    "gpt-large-770m": (773_375_040, 41_943_040, 377_487_360, 0, 4_954_823_040),
    "gpt-xlarge-1_3b": (1_333_868_544, 50_331_648, 603_979_776, 0, 8_607_191_040),
}


@pytest.mark.parametrize("name", presets.RELEASED)
def test_released_params_and_flops_match_spec(name):
    unique, wte, ve, core, fpt = RELEASED[name]
    cfg = presets.released(name)
    p = flops.param_counts(cfg)
    assert (p.unique, p.embedding, p.value_embeddings, p.core) == (unique, wte, ve, core)
    assert p.total == unique - wte
    result = flops.flops_per_token(cfg)
    assert type(result) is int and result == fpt
    assert flops.training_flops_per_token(cfg) == fpt  # released r̄=8, k̄=4: split (4, 4) = (r̄, k̄)


# ---- a tiny Parcae by hand ------------------------------------------------------------------------

D, H, F, V, T = 128, 4, 512, 4096, 256  # tiny.py at block 256: P=1, R=2, C=1, r̄=4, k̄=2, tied, 2 VE


def tiny_model() -> dict:
    return load_config(config_file("tiny"), ["model.block_size=256"]).model.to_dict()


def test_tiny_parcae_by_hand():
    attn, mlp, norms, gate = 4 * D * D, 2 * D * F, 2 * D, 32 * H  # qk-norm has no gain, no biases
    block = attn + mlp + norms
    # VE gates sit on layer ids with id % 2 == (R·k̄ − 1) % 2 = 1: core block 0 (id 1), coda (id P+R·r̄ = 9).
    core = 2 * block + gate
    ve_tables = 2 * V * D  # effective blocks 1 and 3 of 4
    non_core = block + (block + gate) + ve_tables + D * D + (2 * D + D * D) + 2 * D  # C, adapter, 2 norms
    p = flops.param_counts(tiny_model())
    assert (p.embedding, p.core, p.non_core, p.value_embeddings) == (V * D, core, non_core, ve_tables)

    a_core, a_nc = 2 * 4 * D * T, 3 * 2 * 4 * D * T
    f, b = 4, 2
    expected = 6 * non_core + a_nc + 2 * core * f + 4 * core * b + a_core * f + 2 * a_core * b
    assert flops.flops_per_token(tiny_model()) == expected == 18_039_552

    # Hardware: matmul weights only, causal attention halved, head counted, no-grad steps forward only.
    mm_once = (attn + mlp) + (attn + mlp + gate) + D * D + D * D  # prelude, coda, C, injection B
    mm_step = 2 * (attn + mlp) + gate
    causal = 2 * D * T
    once = 2 * mm_once + 2 * causal + 2 * D * V
    step = 2 * mm_step + 2 * causal
    t, s = 2, 2
    hardware = 3 * once + t * step + 3 * s * step
    assert flops.hardware_flops_per_token(tiny_model(), remat=False) == hardware == 13_437_696
    # tiny uses `per-iteration` checkpointing: each gradient step's forward runs twice.
    assert flops.hardware_flops_per_token(tiny_model(), remat=True) == hardware + s * step


def test_flops_f_b_and_seq_len():
    m = tiny_model()
    p = flops.param_counts(m)
    a_core = 2 * 4 * D * T
    base = flops.flops_per_token(m, f=0, b=0)
    assert flops.flops_per_token(m, f=1, b=0) - base == 2 * p.core + a_core  # one forward recurrence
    assert flops.flops_per_token(m, f=0, b=1) - base == 4 * p.core + 2 * a_core  # its backward
    # Only attention depends on T: 4·d·T per layer forward, ×3 outside the loop.
    per_t = 3 * 2 * 4 * D + (4 + 2 * 2) * 2 * 4 * D
    assert flops.flops_per_token(m, seq_len=T + 1) - flops.flops_per_token(m) == per_t


def test_expected_split_and_curriculum():
    assert flops.expected_split(presets.released("parcae-small-140m")) == (4, 4)
    assert flops.expected_split(presets.released("gpt-small-140m")) == (0, 0)
    short = dict(presets.released("parcae-small-140m"), mean_recurrence=2, mean_backprop_depth=4)
    assert flops.expected_split(short) == (0, 4)
    assert flops.training_flops_per_token(short) == flops.flops_per_token(short, f=4, b=4)
    assert flops.flops_per_token(short) == flops.flops_per_token(short, f=2, b=4)  # budget: f=r̄, b=k̄
    ramp = dict(
        presets.released("parcae-small-140m"), sampling_scheme="poisson-truncated-full-curriculum-100"
    )
    assert flops.expected_split(ramp, step=50) == (2, 4)  # forward target: t = ⌈0.5 · 4⌉
    assert flops.expected_split(ramp, step=500) == (4, 4)
    assert flops.training_flops_per_token(ramp, step=50) == flops.flops_per_token(ramp, f=6, b=4)


def test_hardware_flops_gpt_identity():
    """Hardware = official − value-embedding/norm "matmuls" − half of attention + the head."""
    cfg = presets.released("gpt-small-140m")
    p = flops.param_counts(cfg)
    d, L, V_, T_ = 768, 6, 32768, 2048
    not_matmul = p.total - p.matmul["h"]  # value-embedding tables and norm scales
    expected = flops.flops_per_token(cfg) - 6 * not_matmul - 3 * L * 2 * d * T_ + 3 * 2 * d * V_
    assert flops.hardware_flops_per_token(cfg, remat=False) == expected
    blocks_forward = 2 * p.matmul["h"] + L * 2 * d * T_
    assert flops.hardware_flops_per_token(cfg, remat=True) == expected + blocks_forward


def test_hardware_flops_remat_policies():
    def hw(**fields):
        return flops.hardware_flops_per_token(dict(tiny_model(), remat=True, **fields))

    off = flops.hardware_flops_per_token(tiny_model(), remat=False)
    s, core_attn = 2, 2 * 2 * D * T
    assert hw(activation_checkpoint_impl="per-block") == hw(activation_checkpoint_impl="per-iteration")
    assert hw(activation_checkpoint_impl="per-iteration-sac") == off + s * core_attn
    coda_forward = 2 * (4 * D * D + 2 * D * F + 32 * H) + 2 * D * T
    assert hw(activation_checkpoint_impl="in-coda") == off + coda_forward
    # A linear injection multiplies the state by a d_r × d_r block every recurrence.
    lin = dict(tiny_model(), injection_type="linear")
    diag_hw = flops.hardware_flops_per_token(tiny_model(), f=4, b=2, remat=False)
    lin_extra = flops.param_counts(lin).matmul["adapter"] - flops.param_counts(tiny_model()).matmul["adapter"]
    assert lin_extra == D * D  # [h; e] W is (2D × D) versus B (D × D)
    assert flops.hardware_flops_per_token(lin, f=4, b=2, remat=False) == diag_hw + (2 + 3 * 2) * 2 * D * D


# ---- budgets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, steps",
    [("parcae_140m", 21_362), ("parcae_370m", 56_457), ("parcae_770m", 117_492), ("parcae_1_3b", 198_364)],
)
def test_budget_from_max_tokens_matches_spec(config, steps):
    budget = flops.training_budget(load_config(config_file(config)))
    assert budget.criterion == "max_tokens" and budget.tokens_per_step == 256 * 2048 == 524_288
    assert budget.steps == steps


def test_budget_from_flops_params_and_steps():
    small = config_file("parcae_140m")
    fpt = 1_359_902_976
    b = flops.training_budget(load_config(small, ["train.max_tokens=None", "train.max_flops=1e18"]))
    assert (b.criterion, b.tokens, b.flops_per_token) == ("max_flops", 10**18 // fpt, fpt)
    assert b.steps == (10**18 // fpt) // 524_288 == 1402
    assert b.trained_tokens == b.steps * 524_288 and b.total_flops == b.trained_tokens * fpt <= 10**18

    # The official token_to_param_ratio multiplies every unique parameter (spec §3.5: 144,323,136).
    b = flops.training_budget(load_config(small, ["train.max_tokens=None", "train.tokens_per_param=20"]))
    assert b.tokens == 20 * 144_323_136 and b.steps == 20 * 144_323_136 // 524_288
    b = flops.training_budget(load_config(small, ["train.max_tokens=None", "train.tokens_per_param=20",
                                                  "train.tokens_per_param_counts=non_embedding"]))
    assert b.tokens == 20 * 119_157_312

    b = flops.training_budget(load_config(small, ["train.max_tokens=None", "train.max_steps=7"]))
    assert (b.steps, b.tokens) == (7, 7 * 524_288)


def test_budget_needs_exactly_one_criterion():
    with pytest.raises(ValueError, match=r"two stop criteria are set \(train.max_steps=10, "
                                         r"train.max_tokens=11200000000\).*--config.train.max_steps=None"):
        flops.training_budget(load_config(config_file("parcae_140m"), ["train.max_steps=10"]))
    with pytest.raises(ValueError, match="no stop criterion"):
        flops.training_budget(load_config(config_file("parcae_140m"), ["train.max_tokens=None"]))
    with pytest.raises(ValueError, match="less than one step"):
        flops.training_budget(load_config(config_file("parcae_140m"), ["train.max_tokens=1000"]))


# ---- peak FLOP/s ---------------------------------------------------------------------------------


def test_peak_flops_table():
    table = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "TPU v4": 275e12,
        "TPU v5 lite": 197e12,
        "TPU v5": 459e12,
        "TPU v5p": 459e12,
        "TPU v6 lite": 918e12,
        "TPU v4 lite": None,
        "NVIDIA GeForce GTX 1080": None,
    }
    for kind, peak in table.items():
        assert flops.peak_flops_per_device(kind) == peak, kind
    assert flops.peak_flops_per_device() is None  # the test host is a CPU


# ---- config loading and the CLI ------------------------------------------------------------------


def test_load_config_types_and_overrides(tmp_path):
    cfg = load_config(
        config_file("tiny"),
        [
            "model.mean_recurrence=6",
            "--config.model.remat=true",
            "train.max_steps=None",
            "train.max_flops=2.5e15",
            "train.partial_depth_eval=(1, 3)",
            "model.rope_settings.rope_base=10000",
            "model.logit_softcap=30",
            "data.source=dir",
        ],
    )
    assert cfg.model.mean_recurrence == 6 and cfg.model.remat is True
    assert cfg.train.max_steps is None and cfg.train.max_flops == 2.5e15
    assert cfg.train.partial_depth_eval == (1, 3) and cfg.model.rope_settings.rope_base == 10000
    assert cfg.model.logit_softcap == 30.0 and isinstance(cfg.model.logit_softcap, float)
    assert cfg.data.source == "dir"
    with pytest.raises(AttributeError):
        cfg.train.new_field = 1  # locked
    with pytest.raises(ValueError, match="bad config override"):
        load_config(config_file("tiny"), ["model.n_embd=wide"])

    spec = tmp_path / "cfg.py"
    spec.write_text(
        "import ml_collections\n\ndef get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'arg': arg or 'none', 'n': 1})\n"
    )
    assert load_config(f"{spec}:hello").arg == "hello"
    assert load_config(str(spec), ["n=3"]).n == 3


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(UnknownConfigKeyError, match="mean_recurence") as err:
        load_config(config_file("tiny"), ["model.mean_recurence=4"])
    assert "'mean_recurrence'" in str(err.value) and "'n_embd'" in str(err.value)
    with pytest.raises(KeyError, match=r"Valid keys in config: \['data', 'mesh', 'model', 'train'\]"):
        load_config(config_file("tiny"), ["trian.lr=1"])
    with pytest.raises(KeyError, match="is a value, not a section"):
        load_config(config_file("tiny"), ["train.lr.x=1"])


def test_split_config_args():
    argv = ["--config", "c.py:x", "--config.a.b=1", "--config.c", "2", "--help"]
    assert split_config_args(argv) == ("c.py:x", ["a.b=1", "c=2"], ["--help"])
    assert split_config_args(["--config=c.py"]) == ("c.py", [], [])


def test_cli_prints_table(capsys):
    flops.main(["--config", config_file("tiny"), "--config.model.mean_recurrence=6",
                "--config.model.block_size=256", "--config.train.max_steps=600"])
    out = capsys.readouterr().out
    p = flops.param_counts(dict(tiny_model(), mean_recurrence=6))
    for figure in (p.embedding, p.core, p.non_core, p.total, 20_139_264, 600, 600 * 16 * 256):
        assert f"{figure:,}" in out, figure
    assert "official" in out and "hardware" in out and "n/a" in out


def test_cli_rejects_unknown_key(capsys):
    assert flops.main(["--config", config_file("tiny"), "--config.train.max_flop=1"]) == 2
    err = capsys.readouterr().err
    assert "has no field 'max_flop'" in err and "'max_flops'" in err and "Traceback" not in err
    with pytest.raises(UnknownConfigKeyError):  # --debug keeps the exception
        flops.main(["--config", config_file("tiny"), "--config.train.max_flop=1", "--debug"])


def test_as_model_config_accepts_run_configs():
    gpt = load_config(config_file("gpt_140m"))
    assert flops.flops_per_token(gpt) == RELEASED["gpt-small-140m"][4]
    assert math.isclose(flops.param_counts(gpt.model).unique, RELEASED["gpt-small-140m"][0])
    assert isinstance(gpt, ml_collections.ConfigDict)
