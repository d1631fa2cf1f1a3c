"""parcae-xlarge-1_3b: the released configuration and its official training recipe (spec §3.5, §7.1)."""

from parcae_jax import base_config, presets


def get_config(arg=None):
    del arg
    cfg = base_config.base(presets.released("parcae-xlarge-1_3b"))
    cfg.train.lr = 0.006
    cfg.train.muon_lr = 8e-3
    cfg.train.micro_batch_size = 8
    cfg.train.max_tokens = 104_000_000_000
    cfg.train.checkpoint_every = 4096
    cfg.train.eval_every = 4096
    cfg.train.loss_guardrail = "none"
    cfg.train.skip_nonfinite_grads = True
    cfg.model.remat = True  # the xlarge recipe checkpoints each gradient recurrence
    cfg.data.source = "dir"  # FineWeb-Edu shards prepared with `python -m parcae_jax.data.prepare`
    cfg.data.vocab_size = 32768
    return cfg
