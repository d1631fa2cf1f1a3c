"""The full run configuration (big_vision style): `configs/*.py` start from `base(model_fields)`.

Sections: `model` (official model fields + JAX execution fields, see `config.py`), `data`, `train`,
`mesh`. The dict is locked by `train.py`, so a misspelt `--config.a.b=...` fails with the valid keys.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from parcae_jax.config import ModelConfig, field_types


def model_section(model_fields: Mapping[str, Any]) -> dict[str, Any]:
    """The `model` section: every field the arch's config class declares (official defaults filled
    in), so any of them can be overridden. Its keys and types come from the class, never from a list
    kept here: a field the arch lacks (e.g. a Parcae-only one in a GPT) cannot appear."""
    cfg = ModelConfig.from_dict(model_fields)
    section = cfg.to_dict()
    for name, typ in field_types(cfg.arch).items():
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            # Optional fields go in as typed references: `--config.model.x=...` is type-checked even
            # while the value is None (a plain None field would accept anything).
            (inner,) = [t for t in typing.get_args(typ) if t is not type(None)]
            section[name] = ml_collections.FieldReference(section[name], field_type=inner)
    return section


def base(model_fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model_section(model_fields)

    cfg.data = ml_collections.ConfigDict()
    cfg.data.source = "shakespeare"  # 'shakespeare' (embedded corpus, prepared on first use) or 'dir'
    cfg.data.dataset_dir = ml_collections.FieldReference(None, field_type=str)  # prepared shards
    cfg.data.cache_dir = "~/.cache/parcae_jax"
    # Tokenizer the run expects (folder or file); when set, shards made with another one are refused.
    cfg.data.tokenizer = ml_collections.FieldReference(None, field_type=str)
    cfg.data.vocab_size = 4096  # tokenizer size when the embedded corpus is prepared automatically
    # 'best-fit' (official: documents without separators, packed per device micro-batch, padding
    # ignored) or 'bos' (efficient: documents back to back, BOS at each start, no padding).
    cfg.data.packing = "best-fit"
    cfg.data.num_workers = 0
    cfg.data.prefetch = 2

    cfg.train = ml_collections.ConfigDict()
    cfg.train.seed = 42
    cfg.train.world_batch_size = 256  # sequences per optimiser step
    cfg.train.micro_batch_size = 32  # sequences per device per forward/backward
    # Stop criteria: exactly one must be set.
    cfg.train.max_steps = ml_collections.FieldReference(None, field_type=int)
    cfg.train.max_tokens = ml_collections.FieldReference(None, field_type=int)
    cfg.train.max_flops = ml_collections.FieldReference(None, field_type=float)
    cfg.train.tokens_per_param = ml_collections.FieldReference(None, field_type=float)
    # What `tokens_per_param` multiplies: 'unique' (official `token_to_param_ratio`: every unique
    # parameter, embeddings included) or 'non_embedding' (P_total of the FLOP formula).
    cfg.train.tokens_per_param_counts = "unique"
    # Schedule (spec §7.4): fractions < 1 are fractions of max_steps.
    cfg.train.lr = 8e-3
    cfg.train.min_lr = 0.0
    cfg.train.warmup_steps = 0.0
    cfg.train.cooldown_steps = 0.5
    cfg.train.lr_schedule = "trapezoid"  # trapezoid | constant | linear | cosine
    # Optimiser (spec §7.3).
    cfg.train.optimizer = "muon_adamw"  # muon_adamw | adamw
    cfg.train.betas = (0.8, 0.95)
    cfg.train.eps = 1e-10
    cfg.train.weight_decay = 0.0
    cfg.train.muon_lr = 8e-3
    cfg.train.muon_momentum = 0.95
    cfg.train.muon_momentum_warmup_start = 0.85
    cfg.train.muon_momentum_warmup_steps = 300
    cfg.train.muon_wd = 0.2
    cfg.train.muon_ns_steps = 5
    cfg.train.muon_beta2 = 0.95
    # The official recipe orthogonalises in bf16; float32 is slower but removes the bf16 noise of X.
    cfg.train.muon_ortho_dtype = "bfloat16"
    cfg.train.grad_clip = 1.0
    cfg.train.skip_nonfinite_grads = True
    # The official update count (spec §7.5): the update of step 0 is discarded and the run stops after
    # max_steps - 1 steps (so max_steps - 2 updates are applied); the schedules still span max_steps.
    cfg.train.skip_first_step = True
    cfg.train.stop_before_last_step = True
    # 'micro_batch' (official: each device micro-batch's mean over its real tokens, averaged over
    # micro-batches and devices) or 'global' (one mean over every real token of the step).
    cfg.train.loss_normalization = "micro_batch"
    cfg.train.z_loss = 0.0
    # The LM head and loss run over sequence chunks of at most this many tokens under remat, so at most
    # B x loss_chunk_len x V fp32 logits exist at once (0: one chunk). Same loss and gradients.
    cfg.train.loss_chunk_len = 512
    # Sort each step's sequences by their sampled depth and split every device micro-batch into up to
    # this many groups, each running its gradient-free recurrences only to its own largest depth
    # (0: the official layout, every micro-batch loops to its largest depth). Same gradient.
    cfg.train.depth_groups = 8
    cfg.train.loss_guardrail = "stop"  # stop | rollback | none
    cfg.train.guardrail_loss = 6.0
    cfg.train.guardrail_after_tokens = 10_000_000_000
    # Logging, evaluation, checkpoints.
    cfg.train.log_every = 1
    cfg.train.eval_every = 512
    cfg.train.eval_iters = 16
    cfg.train.partial_depth_eval = (1, 2, 4)
    cfg.train.checkpoint_every = 1024
    cfg.train.keep_last = 3
    cfg.train.keep_period = ml_collections.FieldReference(None, field_type=int)
    cfg.train.wandb = False
    cfg.train.wandb_project = "parcae-jax"

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = -1
    cfg.mesh.fsdp = 1
    cfg.mesh.tensor = 1
    return cfg
