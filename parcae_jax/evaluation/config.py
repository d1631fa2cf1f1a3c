"""Evaluation settings for `eval.py` / `python -m parcae_jax.eval`; the argument is the comma-separated
task list. `configs/eval.py` is this file's name in a checkout; an installed package reads it here.

    python eval.py --config configs/eval.py:loss,depth_sweep,core --config.checkpoint=runs/tiny

Tasks: loss, depth_sweep, core, core_extended, lambada, sample (see parcae_jax/evaluation/).
"""

import ml_collections

from parcae_jax.errors import ConfigError
from parcae_jax.evaluation.tasks import TASKS


def get_config(arg=None):
    tasks = tuple(t.strip() for t in (arg or "loss").split(",") if t.strip())
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown eval task(s) {unknown}: choose from {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.tasks = tasks
    # What to evaluate: a training workdir (latest step, or `step`), WORKDIR/checkpoints/STEP, a parcae-jax
    # pretrained folder or an official PyTorch folder.
    c.checkpoint = ""
    c.step = ml_collections.FieldReference(None, field_type=int)
    c.compute_dtype = ""  # e.g. "bfloat16"; empty keeps the checkpoint's (float32 for an official folder)
    c.tokenizer = ""  # default: the run's tokenizer, or one shipped in the model folder
    c.output = ""  # results JSON; empty: print only
    c.plot = ""  # depth-sweep PNG; default next to `output` (or ./depth_sweep.png)
    # Recurrence and initial state: h0 of row r under seed i comes from fold_in(fold_in(key(seed), i), r).
    c.depths = ""  # depths for loss/core/lambada/sample, e.g. "4" or "2,4,8"; empty: mean_recurrence
    c.sweep_depths = ""  # depth_sweep depths; empty: 1 .. 2 x mean_recurrence
    c.seed = 0
    c.state_init_seeds = 1  # average over this many initial-state seeds and report the spread
    # Batching: rows per global batch (rounded up to the data-parallel device count); context length
    # (0: the model's block_size).
    c.batch_size = 16
    c.max_seq_len = 0
    # loss / depth_sweep data: prepared shards (default: the run's dataset) or raw text.
    c.dataset_dir = ""
    c.split = "val"
    # Rows of the split (-1: all). 0: a training workdir's own validation set (exactly the rows and the
    # numbers of the trainer's val_loss_<d>), else the split's first 256 rows.
    c.max_rows = 0
    c.text = ""  # "parquet:GLOB" / "jsonl:GLOB" / "text:GLOB": official BPB rule, one document per row
    c.max_documents = 1000
    # core / core_extended / lambada: the DCLM eval bundle.
    c.bundle_dir = ""  # default ~/.cache/parcae_jax/eval_bundle
    c.download_bundle = False
    c.max_per_task = -1  # -1: every example
    c.fewshot_seeds = "1234"  # official multi-seed runs: "1234,2345,3456"
    # BOS of CORE prompts; -1: the official rule for an official folder (the id the tokenizer declares
    # in tokenizer_config.json, else 1), the tokenizer's BOS for a parcae-jax checkpoint.
    c.bos_id = -1
    c.log_samples = False  # core/core_extended: one JSON line per example in <output stem>.samples.jsonl
    # sample
    c.prompts = "To be, or not to be|ROMEO:"  # '|'-separated
    c.max_new_tokens = 48
    c.temperature = 0.0  # 0: greedy
    c.top_k = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
