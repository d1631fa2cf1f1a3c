"""Command line of generation (`parcae_jax.engine`) and of the adaptive-depth report.

    python -m parcae_jax.generate --model PATH --prompt TEXT [--prompt TEXT ...] [--num-steps N]
        [--temperature T] [--top-k K] [--top-p P] [--max-new-tokens N] [--seed S]
        [--exit-eps EPS] [--exit-criterion residual|kl] [--exited-kv last|frozen]
        [--cache-budget K | --lookup compress-...] [--stop-token ID ...] [--tokenizer DIR]
    python -m parcae_jax.generate report --model PATH [--data DATASET_DIR] --eps 0,1e-3,1e-2
        [--num-steps N] [--exit-criterion residual|kl] [--exited-kv last|frozen] [--block-size T]
        [--batch-size B] [--max-batches N]

PATH is anything `parcae_jax.loading.load_model` takes: a training workdir (latest checkpoint, or
`--step`), one of its step folders, a parcae-jax pretrained folder or an official PyTorch folder. The
tokenizer is `--tokenizer`, else the training run's, else a `tokenizer/` folder inside or next to PATH
(`loading.find_tokenizer`); the report's data defaults to the training run's dataset.
"""

from __future__ import annotations

import argparse
import sys
import time

from parcae_jax import errors, loading
from parcae_jax.depth_report import adaptive_depth_report, format_report
from parcae_jax.engine import check_request, generate
from parcae_jax.errors import ConfigError
from parcae_jax.kv_cache import EXIT_CRITERIA, EXITED_KV
from parcae_jax.sampling import Sampling

_USAGE = __doc__.split("\n\n")[0]


def _add_model_args(parser):
    parser.add_argument("--model", required=True, help="training workdir, native or official folder")
    parser.add_argument("--step", type=int, default=None, help="a workdir's checkpoint (default: latest)")
    parser.add_argument("--num-steps", type=int, default=None, help="recurrences (default mean_recurrence)")
    parser.add_argument("--exit-criterion", choices=EXIT_CRITERIA, default="residual")
    parser.add_argument("--exited-kv", choices=EXITED_KV, default="last",
                        help="K/V an exited token serves at deeper steps (see parcae_jax.kv_cache)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial state and sampling")


def _sample_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.generate", description=_USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--exit-eps", type=float, default=None, help="adaptive depth threshold (default off)")
    parser.add_argument("--cache-budget", type=int, default=None, help="core cache slots per layer")
    parser.add_argument("--lookup", default="full", help="official lookup strategy, e.g. compress-s4")
    parser.add_argument("--stop-token", type=int, action="append", default=None, help="default: EOS")
    parser.add_argument("--no-bos", action="store_true", help="do not start prompts with BOS")
    args = parser.parse_args(argv)

    from parcae_jax.data.tokenizer import load_tokenizer

    loaded = loading.load_model(args.model, args.step)
    tok_path = loading.find_tokenizer(loaded, args.tokenizer)
    if tok_path is None:
        raise ConfigError(f"no tokenizer found for {args.model}; pass --tokenizer PATH")
    tokenizer, model = load_tokenizer(tok_path), loaded.model
    prefix = [] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = [prefix + tokenizer.encode(p) for p in args.prompt]
    default_stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stop = args.stop_token if args.stop_token is not None else default_stop
    streamed = [[] for _ in prompts]
    shown = [""]

    def on_token(t, tokens, done):
        for b, x in enumerate(tokens):
            if x >= 0:
                streamed[b].append(int(x))
        text = tokenizer.decode(streamed[0])
        if text.startswith(shown[0]):  # a partial multi-byte character waits for its next token
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    check_request(model.config, prompts, args.max_new_tokens)  # before the prompt is echoed
    single = len(prompts) == 1
    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    start = time.perf_counter()
    result = generate(
        model, prompts, max_new_tokens=args.max_new_tokens, num_steps=args.num_steps,
        sampling=Sampling(args.temperature, args.top_k, args.top_p), stop_tokens=stop, key=args.seed,
        exit_eps=args.exit_eps, exit_criterion=args.exit_criterion, exited_kv=args.exited_kv,
        lookup=args.lookup, cache_budget=args.cache_budget, on_token=on_token if single else None,
    )
    seconds = time.perf_counter() - start
    if single:
        sys.stdout.write(tokenizer.decode(result.tokens[0])[len(shown[0]):] + "\n")
    else:
        for prompt, tokens in zip(args.prompt, result.tokens, strict=True):
            print(f"--- {prompt}{tokenizer.decode(tokens)}")
    n = sum(len(t) for t in result.tokens)
    depth = f", mean depth {result.mean_depth:.2f}" if model.config.arch == "parcae" else ""
    print(f"[{n} tokens in {seconds:.2f} s (compile included){depth}]", file=sys.stderr)
    return 0


def _report_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.generate report",
                                     description="Adaptive depth: mean depth and loss against fixed depth.")
    _add_model_args(parser)
    parser.add_argument("--data", default=None, help="prepared token dataset folder (default: the run's)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--eps", default="0,1e-3,3e-3,1e-2,3e-2,1e-1", help="comma list of thresholds")
    parser.add_argument("--block-size", type=int, default=None, help="default: the model's block_size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=4)
    args = parser.parse_args(argv)

    from parcae_jax.data.pipeline import eval_batches

    loaded = loading.load_model(args.model, args.step)
    model, data = loaded.model, args.data or loading.find_dataset(loaded.run_config)
    if data is None:
        raise ConfigError(f"{args.model} is not a training workdir: pass --data DATASET_DIR")
    block = args.block_size or model.config.block_size
    batches = eval_batches(data, split=args.split, block_size=block, batch_size=args.batch_size,
                           max_batches=args.max_batches)
    eps = [float(x) for x in args.eps.split(",") if x.strip()]
    rows = adaptive_depth_report(model, batches, eps, num_steps=args.num_steps, criterion=args.exit_criterion,
                                 exited_kv=args.exited_kv, key=args.seed)
    steps = args.num_steps or model.config.mean_recurrence
    print(f"max depth {steps}, {rows[0]['tokens']} tokens of {data} ({args.split})")
    print(format_report(rows))
    return 0


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    return _sample_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
