"""gpt-large-770m: the released configuration and its official training recipe (spec §3.5, §7.1)."""

from parcae_jax import base_config, presets


def get_config(arg=None):
    del arg
    cfg = base_config.base(presets.released("gpt-large-770m"))
    cfg.train.lr = 0.006
    cfg.train.muon_lr = 8e-3
    cfg.train.micro_batch_size = 32
    cfg.train.max_tokens = 61_600_000_000
    cfg.train.checkpoint_every = 4096
    cfg.train.eval_every = 4096
    cfg.train.loss_guardrail = "stop"
    cfg.train.skip_nonfinite_grads = True
    cfg.train.partial_depth_eval = ()
    cfg.data.source = "dir"  # FineWeb-Edu shards prepared with `python -m parcae_jax.data.prepare`
    cfg.data.vocab_size = 32768
    return cfg
