"""Checkpoint conversion between the official PyTorch format and parcae-jax.

    python -m parcae_jax.convert from-torch SRC DST   # official folder -> native parcae-jax folder
    python -m parcae_jax.convert to-torch SRC DST     # native folder or training workdir -> official
    python -m parcae_jax.convert from-torch hf://SandyResearch/parcae-small-140m DST   # from the Hub
    python -m parcae_jax.convert to-torch runs/tiny DST --push-to-hub ORG/NAME       # and publish

`to-torch` writes `config.json` (every official field + `_class_name`), `model.pt` (the exact key set,
order, shapes and dtypes of the official `state_dict`, `freqs_cis` included, tied tensors sharing
storage) and `model.safetensors` (same tensors, tied ones stored as copies since safetensors cannot
share). Destinations are written to a temporary folder and renamed, so a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from parcae_jax import errors, fileio, hub, loading, pretrained, weights
from parcae_jax.config import ModelConfig, write_folder_config


def torch_rope_table(cfg: ModelConfig):
    """`freqs_cis` computed with torch in fp32 exactly as the official code does (bit-identical)."""
    torch = pretrained._import_torch()
    d = cfg.head_size
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(cfg.rope_table_length).float() / cfg.rope_condense_ratio
    ang = torch.outer(pos, inv)
    return torch.stack([ang.cos(), ang.sin()], -1)[None, :, None].contiguous()


def export_official(model, extra, dst: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    torch = pretrained._import_torch()
    from safetensors.torch import save_file

    dst = pathlib.Path(dst).expanduser().resolve()
    if dst.exists() and not overwrite:
        raise errors.ExistsError(f"{dst} already exists; choose another destination or pass --force")
    cfg: ModelConfig = model.config
    arrays = weights.to_official(model, extra, rope=torch_rope_table(cfg).numpy())
    tensors, seen = {}, {}
    for key, arr in arrays.items():
        if id(arr) in seen:  # tied: the same storage under both names, as torch.save keeps it
            tensors[key] = seen[id(arr)]
            continue
        t = torch.from_numpy(arr.copy())
        tensors[key] = seen[id(arr)] = t
    with fileio.replacing_folder(dst) as tmp:
        write_folder_config(cfg, tmp, native=False)
        torch.save(type(arrays)(tensors), tmp / "model.pt")
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    return dst


def from_torch(src, dst, *, overwrite: bool = False) -> pathlib.Path:
    if not hub.is_hub_path(src) and pretrained.is_native(pathlib.Path(src).expanduser()):
        raise errors.ConfigError(f"{src} is already a parcae-jax folder (it has params/); use to-torch to "
                                 "export it")  # refused before loading it for nothing
    loaded = loading.load_model(src, compute_dtype="float32")
    if loaded.kind != "official":
        raise errors.ConfigError(f"{loaded.path} is a training workdir, not an official PyTorch folder")
    return pretrained.save_pretrained(loaded.model, dst, extra=loaded.extra, overwrite=overwrite)


def to_torch(src, dst, *, step: int | None = None, overwrite: bool = False) -> pathlib.Path:
    """Export anything `loading.load_model` takes (a native folder, a workdir or one of its steps)."""
    loaded = loading.load_model(src, step, compute_dtype="float32")
    return export_official(loaded.model, loaded.extra, dst, overwrite=overwrite)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parcae_jax.convert", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-torch", help="official PyTorch folder -> parcae-jax folder")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--force", action="store_true", help="replace DST if it exists")
    b = sub.add_parser("to-torch", help="parcae-jax folder or training workdir -> official PyTorch folder")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    b.add_argument("--force", action="store_true", help="replace DST if it exists")
    b.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                   help="then publish DST as this Hugging Face Hub model repository (needs a login)")
    b.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    args = parser.parse_args(argv)
    if args.cmd == "from-torch":
        out = from_torch(args.src, args.dst, overwrite=args.force)
    else:
        out = to_torch(args.src, args.dst, step=args.step, overwrite=args.force)
        if args.push_to_hub:
            print(f"pushed to {hub.push_folder(out, args.push_to_hub, private=args.private)}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
