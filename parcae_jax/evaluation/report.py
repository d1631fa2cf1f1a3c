"""The printed summary of an `eval.py` results document: one small table per task."""

from __future__ import annotations

import math

from parcae_jax.evaluation.testtime_law import describe_fit

SHORT_TYPES = {"multiple_choice": "MC", "language_modeling": "LM", "schema": "schema"}


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _pm(mean, std, digits: int = 4) -> str:
    if std is None or not std:
        return _num(mean, digits)
    return f"{_num(mean, digits)} ± {std:.2g}"  # two significant digits: the spread is often tiny


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def _loss_table(by_depth: dict) -> str:
    rows = []
    for d, m in by_depth.items():
        rows.append([d, _pm(m.get("loss"), m.get("loss_std")), _num(m.get("ppl"), 2),
                     _pm(m.get("bpb"), m.get("bpb_std")), _num(m.get("val_loss")),
                     _num(m.get("tokens", m.get("targets")))])
    return table(["depth", "loss", "ppl", "bpb", "val_loss", "tokens"], rows)


def _sweep_table(sweep: dict) -> str:
    rows = [[str(d), _pm(loss, std)] for d, loss, std in
            zip(sweep["depths"], sweep["losses"], sweep["losses_std"], strict=True)]
    text = table(["depth", sweep["metric"]], rows)
    fit = sweep.get("fit")
    text += "\n" + (f"fit: {describe_fit(fit)}" if fit else f"fit: none ({sweep.get('fit_error')})")
    if sweep.get("plot"):
        text += f"\nplot: {sweep['plot']}"
    return text


def _suite_table(suite: dict) -> str:
    parts = []
    for depth, result in suite["depths"].items():
        rows = []
        for label, m in result["tasks"].items():
            info = suite["tasks"][label]
            kind = SHORT_TYPES.get(info["task_type"], info["task_type"])
            rows.append([label, kind, str(info["num_fewshot"]), str(info["num_examples"]),
                         _pm(m["accuracy"], m["accuracy_std"]), _pm(m["centered"], m["centered_std"]),
                         _num(info["baseline"], 1)])
        head = f"{suite['suite']} at depth {depth}"
        parts.append(head + "\n" + table(["task", "type", "shots", "n", "accuracy", "centered", "baseline %"],
                                         rows))
        core = result.get("core_metric")
        partial = "" if result["complete"] else f" (partial: {result['core_tasks']} of 22 CORE tasks)"
        parts.append(f"CORE {_pm(core, result.get('core_metric_std'))}{partial}")
        if "core_extended_metric" in result:
            metric = _pm(result["core_extended_metric"], result["core_extended_metric_std"])
            parts.append(f"Core-Extended {metric} over {result['num_tasks']} tasks")
    if suite["missing"]:
        parts.append(f"missing from the bundle: {', '.join(suite['missing'])}")
    for label, why in suite.get("skipped", {}).items():
        parts.append(f"skipped {label}: {why}")
    return "\n".join(parts)


def _lambada_table(result: dict) -> str:
    if "missing" in result:
        return f"missing: {result['missing']}"
    rows = [[d, _pm(m["accuracy"], m["accuracy_std"]), _pm(m["perplexity"], m["perplexity_std"], 2)]
            for d, m in result["depths"].items()]
    return f"{result['num_examples']} examples\n" + table(["depth", "accuracy", "perplexity"], rows)


def _samples(result: dict) -> str:
    return "\n".join(f"[{s['prompt']!r}] -> {s['completion']!r}" for s in result["samples"])


def format_results(results: dict) -> str:
    ck = results["checkpoint"]
    lines = [f"checkpoint {ck['path']} ({ck['kind']}{', step ' + str(ck['step']) if ck['step'] else ''}, "
             f"params {ck['params_digest']}), state seed {results['state_init']['seed']} "
             f"x{results['state_init']['num_seeds']}"]
    render = {"loss": lambda r: _loss_table(r["depths"]), "depth_sweep": _sweep_table, "core": _suite_table,
              "core_extended": _suite_table, "lambada": _lambada_table, "sample": _samples}
    for task, result in results["tasks"].items():
        lines.append(f"\n## {task} ({results['timing'].get(task, 0):.1f} s)")
        if isinstance(result.get("skipped"), str):  # the whole task (a suite's dict lists its tasks)
            lines.append(f"skipped: {result['skipped']}")
        else:
            lines.append(render[task](result))
    footer = f"\ntotal {results['timing'].get('total', 0):.1f} s; {results.get('compiled_programs')} compiled"
    footer += " scoring program(s)" + (f"; results: {results['output']}" if results.get("output") else "")
    lines.append(footer)
    return "\n".join(lines)
