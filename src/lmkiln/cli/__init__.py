"""The `kiln` command: one verb per stage, plus `run`, `generate`, `serve` and the rest; each verb's
parsed arguments handed to the one library function that does it (the arguments: cli/parser.py).

Stage verbs take an optional recipe and `key.sub=value` overrides:
    kiln run recipes/quickstart.yaml run_dir=/tmp/x pretrain.max_steps=50
A user mistake prints one line and exits 2; a bug raises with its traceback (exit 1).
"""

from __future__ import annotations

import os
import sys

from lmkiln.cli.parser import STAGE_HELP, build_parser
from lmkiln.errors import UserError


def _recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    recipe = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif recipe is None:
            recipe = item
        else:
            raise UserError(f"unexpected argument '{item}': give one recipe, then KEY=VALUE overrides")
    return recipe, overrides


def _recipe(args):
    """The recipe and overrides a verb names, with its options set as the recipe fields they stand for."""
    from lmkiln.config import load_recipe, resolve_recipe_path

    path, overrides = _recipe_and_overrides(args.recipe)
    settings: dict = {}
    if getattr(args, "tasks", None):
        settings["eval"] = {"tasks": args.tasks}
    if getattr(args, "limit", None) is not None:
        settings.setdefault("eval", {}).update(icl_max_examples=args.limit, max_examples=args.limit)
    if getattr(args, "task", None):
        settings["finetune"] = {"task": args.task}
    return load_recipe(resolve_recipe_path(path) if path else None, overrides, settings)


# Each verb: its parsed arguments handed to the one library function that does it.


def _stages(args) -> None:
    if args.verb == "finetune" and args.preview is not None:
        from lmkiln.train.finetune import preview

        return preview(_recipe(args), args.preview)
    if args.verb == "eval" and args.models:
        from lmkiln.eval.stage import compare

        return compare(_recipe(args), args.models, args.out, args.force)
    from lmkiln.pipeline import run_recipe

    run_recipe(_recipe(args), force=args.force, only=None if args.verb == "run" else [args.verb])


def _tune(args) -> None:
    from lmkiln.train.search import tune

    tune(_recipe(args), args.trials)


def _estimate(args) -> None:
    from lmkiln.train.estimate import estimate, print_estimate

    print_estimate(estimate(_recipe(args), world=args.world, device=args.device))


def _generate(args) -> None:
    from lmkiln.model.inference.generate import print_continuation

    print_continuation(
        args.model,
        args.prompt,
        args.chat,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.device,
        args.compile,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
    )


def _serve(args) -> None:
    from lmkiln.serve.server import serve

    serve(
        args.model,
        args.host,
        args.port,
        args.name,
        args.device,
        args.adapter,
        args.max_batch,
        args.max_queue,
        args.context,
        args.api_key or os.environ.get("LMKILN_API_KEY"),
        args.cors,
        args.max_request_bytes,
        args.log_requests,
        args.log_redact,
        args.log_max_mb,
        args.log_max_files,
        args.models_file,
        args.version_name,
        args.blocklist,
        args.max_concurrent,
        args.prefix_cache_mb,
    )


def _chat(args) -> None:
    from lmkiln.serve.terminal import chat_loop

    chat_loop(args.model, args.device, args.temperature, args.top_p, args.max_tokens, args.system, args.seed)


def _import(args) -> None:
    from lmkiln.model.convert.importer import import_and_report

    import_and_report(args.source, args.out, args.dtype, args.force)


def _quantize(args) -> None:
    from lmkiln.model.convert.quantize import quantize_and_report

    quantize_and_report(args.model, args.out, args.quant, args.force)


def _export(args) -> None:
    from lmkiln.model.convert.export import export_and_report

    export_and_report(
        args.model,
        args.out,
        merge=args.merge,
        base=args.base,
        fmt=args.format,
        dtype=args.dtype,
        force=args.force,
        quant=args.quant,
    )


def _monitor(args) -> int:
    import time

    from lmkiln.monitor.alerts import Gauges
    from lmkiln.monitor.drift import check_drift
    from lmkiln.monitor.live import monitor_once

    if args.concurrency < 1 or args.timeout <= 0 or (args.every is not None and args.every <= 0):
        raise UserError("--concurrency, --timeout and --every must be positive")
    if not args.tasks and not args.drift:
        raise UserError("kiln monitor: nothing to check: name --tasks, or --drift with --requests")
    if args.drift and args.requests is None:
        raise UserError("--drift: name the request log with --requests DIR (kiln serve --log-requests DIR)")
    if args.drift_sample < 20 or args.drift_threshold <= 0 or (args.window is not None and args.window <= 0):
        raise UserError("--drift-sample must be at least 20; --drift-threshold and --window must be positive")
    recipe = _recipe(args)
    gauges = Gauges(args.metrics_port) if args.metrics_port is not None else None
    options = {
        "sample": args.drift_sample,
        "threshold": args.drift_threshold,
        "concurrency": args.concurrency,
        "timeout": args.timeout,
        "api_key": args.api_key,
        "columns": recipe.eval.columns or recipe.finetune.columns,
    }
    while True:
        code = 0
        if args.tasks:
            code = monitor_once(
                recipe,
                args.url,
                args.model,
                args.history,
                args.baseline,
                args.webhook,
                args.concurrency,
                args.timeout,
                gauges,
                args.api_key,
            )
        if args.drift:
            drifted = check_drift(
                args.url,
                args.model,
                args.requests,
                args.reference,
                args.window,
                args.drift_history,
                options,
                args.webhook,
                gauges,
            )
            code = max(code, drifted)
        if args.every is None:
            return code
        time.sleep(args.every * 60)


def _monitor_report(args) -> None:
    from lmkiln.log import console
    from lmkiln.monitor.report import write_report

    out = write_report(args.history, args.drift_history, args.out)
    console.print(f"kiln monitor report: {out}")


VERBS = {
    "run": _stages,
    "monitor": _monitor,
    "monitor report": _monitor_report,
    **{name: _stages for name in STAGE_HELP},
    "tune": _tune,
    "estimate": _estimate,
    "generate": _generate,
    "import": _import,
    "quantize": _quantize,
    "export": _export,
    "serve": _serve,
    "chat": _chat,
}


def dispatch(args) -> int:
    from lmkiln import __version__
    from lmkiln.log import set_quiet

    set_quiet(args.quiet)
    if args.version:
        print(f"lmkiln {__version__}")
        return 0
    outcome = VERBS[args.verb](args)
    return outcome if isinstance(outcome, int) else 0  # a verb may name its own exit code (monitor's alert)


def _joined_verbs(argv: list[str]) -> list[str]:
    """`kiln monitor report` as the one verb "monitor report" (`kiln monitor URL` stays as it is)."""
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb is not None and argv[verb : verb + 2] == ["monitor", "report"]:
        return argv[:verb] + ["monitor report"] + argv[verb + 2 :]
    return argv


def _is_override(value: str) -> bool:
    """`eval.max_examples=8` after --models or --tasks is an override; `imported=DIR` a labelled model."""
    if "=" not in value:
        return False
    from lmkiln.config import Recipe

    head = value.split("=", 1)[0].split(".")[0]
    return head in {field.alias or name for name, field in Recipe.model_fields.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_joined_verbs(list(sys.argv[1:] if argv is None else argv)))
    # Overrides may also come after an option (`kiln tune RECIPE --trials 4 finetune.lr=1e-3`).
    if (
        extra
        and isinstance(getattr(args, "recipe", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.recipe += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for listed in ("models", "tasks"):  # nargs="+" options swallow overrides that follow them
        values = getattr(args, listed, None)
        if values and isinstance(getattr(args, "recipe", None), list):
            setattr(args, listed, [v for v in values if not _is_override(v)])
            args.recipe += [v for v in values if _is_override(v)]
    if args.verb is None and not args.version:
        parser.print_help()
        return 2
    try:
        return dispatch(args)
    except UserError as exc:
        # one line, whatever the message quotes (a value with a newline in it stays on it, escaped)
        print("kiln: error: " + str(exc).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
