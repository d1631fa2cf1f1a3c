"""The paper's isoFLOP grid (spec §10, `runs/sweep_recurrence.sh`): parcae-small-140m trained at mean
recurrences {1, 2, 4, 6, 8, 10, 12} with backprop depth ⌈r/2⌉, under FLOP budgets {1e18 … 1.6e19}.
35 runs; `python -m parcae_jax.scaling plan --sweep configs/sweeps/paper_140m.py --root DIR`."""

import ml_collections


def get_config(arg=None):
    del arg
    cfg = ml_collections.ConfigDict()
    cfg.name = "paper_140m"
    cfg.base_config = "configs/parcae_140m.py"
    # Applied to every point after the point's own overrides. The official sweep effectively disables
    # periodic evaluation (the final validation at the last step still runs).
    cfg.overrides = ("train.eval_every=1000000",)
    cfg.mean_recurrences = (1, 2, 4, 6, 8, 10, 12)
    cfg.backprop_depth = "ceil_half"  # ceil_half: ⌈r/2⌉ | equal: r | fixed:K
    cfg.flop_budgets = (1e18, 2e18, 4e18, 8e18, 1.6e19)
    # Test-time depth sweep after training (for the saturation law L(T) = L_inf + Z·exp(−z·T)):
    # the depths of `depths` up to max(max_factor · r, min_max_depth).
    cfg.depth_sweep = ml_collections.ConfigDict()
    cfg.depth_sweep.depths = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24)
    cfg.depth_sweep.max_factor = 2.0
    cfg.depth_sweep.min_max_depth = 4
    cfg.depth_sweep.batches = 16  # validation batches of `batch_size` rows (None: the whole split)
    cfg.depth_sweep.batch_size = 32
    return cfg
