"""A CPU-sized isoFLOP sweep (3 recurrences × 2 budgets, a few minutes on 2 cores): the tiny Parcae
narrowed to width 64, one core block, 64-token rows, a 1024-piece tokenizer, 8 rows per step.
It exercises plan → run → fit end to end; budgets this small do not reproduce the paper's exponents."""

import ml_collections

_SMALL_MODEL = (
    "model.n_embd=64",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=256",
    "model.recurrent_embedding_dimension=64",
    "model.recurrent_intermediation_embedding_dimension=256",
    "model.n_layers_in_recurrent_block=1",
    "model.block_size=64",
    "model.vocab_size=1024",
    "data.vocab_size=1024",
)


def get_config(arg=None):
    del arg
    cfg = ml_collections.ConfigDict()
    cfg.name = "tiny_cpu"
    cfg.base_config = "configs/tiny.py"
    cfg.overrides = _SMALL_MODEL + (
        "train.world_batch_size=8",
        "train.micro_batch_size=8",
        "train.log_every=50",
        "train.eval_every=1000000",  # only the final validation
        "train.checkpoint_every=1000000",  # only the final checkpoint
    )
    cfg.mean_recurrences = (1, 2, 4)
    cfg.backprop_depth = "ceil_half"
    cfg.flop_budgets = (2e11, 6e11)
    cfg.depth_sweep = ml_collections.ConfigDict()
    cfg.depth_sweep.depths = (1, 2, 3, 4, 6, 8)
    cfg.depth_sweep.max_factor = 2.0
    cfg.depth_sweep.min_max_depth = 4
    cfg.depth_sweep.batches = 8
    cfg.depth_sweep.batch_size = 8
    return cfg
