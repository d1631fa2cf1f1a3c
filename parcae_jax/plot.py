"""Plot a run's training curve from `WORKDIR/metrics.jsonl`.

    python -m parcae_jax.plot runs/tiny --output docs/tiny_curve.png [--dataset-dir DIR | --unigram-entropy H]

Left: training loss and validation loss per evaluation depth against tokens. Right: the Parcae
telemetry (spectral radius of the injection, state norm) when present.
"""

from __future__ import annotations

import argparse
import sys

from parcae_jax import errors
from parcae_jax.errors import UserError
from parcae_jax.metrics import read_metrics


def plot_run(workdir: str, output: str, *, unigram_entropy: float | None = None, title: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    if not rows:
        raise UserError(f"{workdir}/metrics.jsonl has no rows to plot")
    has_telemetry = any("rho_A" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_telemetry else 1, figsize=(11 if has_telemetry else 6, 4))
    ax = axes[0] if has_telemetry else axes
    tokens = [r["tokens"] / 1e6 for r in rows]
    ax.plot(tokens, [r["loss"] for r in rows], lw=1, alpha=0.7, label="train loss")
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_loss")},
                      key=lambda k: int(k.rsplit("_", 1)[1]) if k[-1].isdigit() else 0)
    for key in val_keys:
        points = [(r["tokens"] / 1e6, r[key]) for r in rows if key in r]
        depth = key.rsplit("_", 1)[1] if key[-1].isdigit() else ""
        label = f"val loss, {depth} loops" if depth else "val loss"
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="grey", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or workdir)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if has_telemetry:
        tax = axes[1]
        steps = [r["step"] for r in rows if "rho_A" in r]
        tax.plot(steps, [r["rho_A"] for r in rows if "rho_A" in r], label="ρ(A) of the injection")
        tax.set_ylim(0, 1.05)
        tax.set_xlabel("step")
        tax.set_ylabel("spectral radius")
        norm_ax = tax.twinx()
        norm_ax.plot(steps, [r.get("state_norm", float("nan")) for r in rows if "rho_A" in r], color="C3",
                     label="state norm")
        norm_ax.set_ylabel("state norm")
        tax.legend(loc="lower left", fontsize=8)
        norm_ax.legend(loc="lower right", fontsize=8)
        tax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--output", required=True)
    parser.add_argument("--unigram-entropy", type=float, default=None)
    parser.add_argument("--dataset-dir", default=None, help="draw the unigram entropy of this dataset")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    entropy = args.unigram_entropy
    if entropy is None and args.dataset_dir:
        from parcae_jax.data.shards import unigram_entropy

        entropy = unigram_entropy(args.dataset_dir)
        print(f"unigram entropy of {args.dataset_dir}: {entropy:.3f} nats/token")
    print(plot_run(args.workdir, args.output, unigram_entropy=entropy, title=args.title))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
