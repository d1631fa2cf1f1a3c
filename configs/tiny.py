"""tiny: a CPU-sized Parcae (all 140M architecture choices, small widths) trained on the embedded
Shakespeare corpus. The README's main job; also the model used by tests and demos."""

from parcae_jax import base_config, presets

_WIDTHS = dict(
    block_size=128,
    vocab_size=4096,
    n_embd=128,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=512,
)


def get_config(arg=None):
    """`configs/tiny.py` is the Parcae; `configs/tiny.py:gpt` its GPT pair: the same widths, training
    and data, with as many layers as the Parcae has unique ones (the released pairs' ratio)."""
    if arg not in (None, "", "parcae", "gpt"):
        raise ValueError(f"configs/tiny.py takes no argument or 'gpt', got {arg!r}")
    if arg == "gpt":
        model = presets.released("gpt-small-140m")
        model.update(
            name="gpt-tiny", hf_config={"org": "parcae-jax", "name": "gpt-tiny"}, n_layer=4, **_WIDTHS
        )
    else:
        model = presets.released("parcae-small-140m")
        model.update(
            name="parcae-tiny",
            hf_config={"org": "parcae-jax", "name": "parcae-tiny"},
            recurrent_embedding_dimension=128,
            recurrent_intermediation_embedding_dimension=512,
            n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2,
            n_layers_in_coda=1,
            mean_recurrence=4,
            mean_backprop_depth=2,
            **_WIDTHS,
        )
    cfg = base_config.base(model)
    cfg.model.compute_dtype = "float32"  # CPU: bf16 matmuls are emulated and slower
    cfg.data.source = "shakespeare"
    cfg.data.vocab_size = 4096
    cfg.train.world_batch_size = 16
    cfg.train.micro_batch_size = 16
    cfg.train.max_steps = 300  # ~600k tokens: fits the README's 10-minute CPU budget
    cfg.train.lr = 3e-3
    cfg.train.muon_lr = 2e-2
    cfg.train.log_every = 10
    cfg.train.eval_every = 50
    cfg.train.eval_iters = 8
    cfg.train.checkpoint_every = 100
    cfg.train.loss_guardrail = "none"
    # The efficient path (docs/official_recipe.md): BOS-joined rows without padding, one loss mean over
    # the step, every step applied.
    cfg.data.packing = "bos"
    cfg.train.loss_normalization = "global"
    cfg.train.skip_first_step = False
    cfg.train.stop_before_last_step = False
    return cfg
