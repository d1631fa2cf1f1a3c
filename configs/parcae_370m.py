"""parcae-medium-370m: the released configuration and its official training recipe (spec §3.5, §7.1)."""

from parcae_jax import base_config, presets


def get_config(arg=None):
    del arg
    cfg = base_config.base(presets.released("parcae-medium-370m"))
    cfg.train.lr = 0.008
    cfg.train.muon_lr = 8e-3
    cfg.train.micro_batch_size = 16
    cfg.train.max_tokens = 29_600_000_000
    cfg.train.checkpoint_every = 2048
    cfg.train.eval_every = 1024
    cfg.train.loss_guardrail = "stop"
    cfg.train.skip_nonfinite_grads = True
    cfg.data.source = "dir"  # FineWeb-Edu shards prepared with `python -m parcae_jax.data.prepare`
    cfg.data.vocab_size = 32768
    return cfg
