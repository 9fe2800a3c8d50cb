"""Command line: `quantkit run|validate|compare|methods` plus the stage commands (check, build, package, bench)
and `sweep` / `choose` (quantkit.sweep)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

from quantkit.errors import QuantkitError

# Modules that add their own sub-commands through `register_cli(subparsers)`.
STAGE_COMMANDS = ("quantkit.check", "quantkit.build", "quantkit.package", "quantkit.bench", "quantkit.sweep")


@contextlib.contextmanager
def _located(recipe):
    """Point errors about a recipe field at the file and line that set it."""
    try:
        yield
    except QuantkitError as exc:
        if exc.where and exc.where.split(".")[0] in type(recipe).model_fields:
            exc.where = recipe.locate(exc.where)
        raise


def _cmd_run(args: argparse.Namespace) -> int:
    from quantkit.pipeline import run_recipe
    from quantkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    args.run_dir = recipe.run_dir()  # where main() leaves the debug log
    with _located(recipe):
        run_dir = run_recipe(recipe, force=args.force, device=args.device)
    print((run_dir / "summary.md").read_text())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from quantkit.methods import resolved_settings
    from quantkit.pipeline import preflight
    from quantkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    with _located(recipe):
        preflight(recipe)  # model, shapes, calibration data and tasks, as `run` checks them
    print(f"{args.recipe}: valid. Method {recipe.quantize.method} with {resolved_settings(recipe.quantize)}; "
          f"run folder {recipe.run_dir()}")
    if args.show:
        print(recipe.to_yaml())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from quantkit.choose import parse_budget
    from quantkit.report import compare_runs
    from quantkit.sweep import STATE, unusable_points

    runs = [Path(r) for r in args.runs]
    baseline = Path(args.baseline) if args.baseline else None
    limits = parse_budget(args.max_loss)
    unusable: dict[str, str] = {}
    for r in runs:  # failed / invalid points of a sweep folder, so the budget's report names them too
        unusable.update(unusable_points(r / STATE))
    if args.out and not args.out.endswith(".md"):
        # A folder: markdown, CSV, self-contained HTML and PNG plots (and the budget's choice).
        from quantkit.report import parse_metric, write_compare

        out = write_compare(runs, Path(args.out), baseline, metrics=[parse_metric(m) for m in args.metric] or None,
                            limits=limits or None, by=args.by, unusable=unusable)
        print(out["markdown"])
        print("wrote " + ", ".join(str(f) for f in out["files"]), file=sys.stderr)
        return 0
    table = compare_runs(runs, baseline)
    if limits:
        from quantkit.choose import choose
        from quantkit.report import load_runs

        loaded, base = load_runs(runs, baseline)
        table += "\n\n" + choose(loaded, base, limits, args.by, unusable=unusable).render()
    print(table)
    if args.out:
        from quantkit.runfolder import atomic_write_text

        atomic_write_text(Path(args.out), table + "\n")
    return 0


def _cmd_methods(_: argparse.Namespace) -> int:
    from quantkit.methods import METHODS

    for m in METHODS.values():
        knobs = ", ".join(sorted(m.knobs)) or "-"
        print(f"{m.name:10s} {m.description}\n{'':10s} knobs: {knobs}; TensorRT-LLM quant_algo: {m.trtllm_quant_algo}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description="Post-training quantization of LLMs from a recipe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (ModelOpt's own output too)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe end to end into its run folder")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. quantize.block_size=64")
    p.add_argument("--force", action="store_true", help="delete the run folder first and redo every stage")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output-dir", default=None, help="parent folder for the run folder (default: recipe's output_dir)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--show", action="store_true", help="print the fully resolved recipe")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("compare", help="accuracy table across run folders (and plots, HTML, CSV with --out DIR)")
    p.add_argument("runs", nargs="+", help="run folders, or a sweep folder")
    p.add_argument("--baseline", default=None,
                   help="run folder to compute deltas against (default: the method-none run)")
    p.add_argument("--out", default=None,
                   help="a folder: table.md, table.csv, index.html (self-contained) and PNG plots; "
                   "a .md file: the markdown table only")
    p.add_argument("--metric", action="append", default=[], metavar="TASK.METRIC",
                   help="with --out DIR: metric to plot against size/speed (repeatable; default "
                   "wiki_ppl.word_perplexity)")
    p.add_argument("--max-loss", action="append", default=[], metavar="TASK.METRIC=X[%|pt]",
                   help="accuracy budget: the choice is reported and drawn in the plots (see `quantkit choose`)")
    from quantkit.choose import BY

    p.add_argument("--by", choices=list(BY), default="size", help="what the budget's choice optimizes")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("methods", help="list quantization methods")
    p.set_defaults(func=_cmd_methods)

    for module_name in STAGE_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "register_cli"):
            module.register_cli(sub)
    return parser


DEBUG_LOG = "debug.log"  # in the run folder: everything the libraries said, which the terminal leaves out
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Console(logging.Filter):
    """The terminal shows quantkit's own lines; other libraries only when something failed (ERROR)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "quantkit" or record.levelno >= logging.ERROR


class _ToDebugLog(logging.Filter):
    """On a logger that prints through its own handler (DeepSpeed's goes to stdout, propagation off):
    hand each record to the debug log instead."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def setup_logging(verbose: bool, quiet_libraries: bool) -> Path:
    """Console: quantkit's stage lines (everything with -v). A temporary debug log gets every record, Python
    warnings included; `run` moves it into the run folder. `quiet_libraries` (commands that load models) also
    routes transformers' and datasets' own handlers and progress bars there, keeping one bar per long step
    (calibration, lm-eval's requests). Safe to call again (tests call main() repeatedly)."""
    import tempfile

    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_quantkit", False)]:
        root.removeHandler(h)
        h.close()
    deepspeed = logging.getLogger("DeepSpeed")
    for f in [f for f in deepspeed.filters if isinstance(f, _ToDebugLog)]:
        deepspeed.removeFilter(f)
    fd, name = tempfile.mkstemp(prefix="quantkit-", suffix=".log")
    os.close(fd)
    debug = logging.FileHandler(name, encoding="utf-8")
    debug.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(_Console())
    for h in (debug, console):
        h._quantkit = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # transformers' and torch's deprecation warnings go to the log as well
    deepspeed.addFilter(_ToDebugLog(debug))  # created later by `import deepspeed` (through ModelOpt)
    if quiet_libraries:
        import datasets.utils.logging as ds_logging
        import transformers.utils.logging as tf_logging

        tf_logging.disable_default_handler()
        tf_logging.enable_propagation()
        tf_logging.disable_progress_bar()  # weight loading and per-shard write bars
        ds_logging.disable_progress_bar()  # "Generating test split", "Map"
        datasets_root = logging.getLogger("datasets")
        for h in [h for h in datasets_root.handlers if type(h) is logging.StreamHandler]:
            datasets_root.removeHandler(h)  # its own stderr handler; records still propagate to the debug log
        for lib in ("transformers", "datasets"):
            logging.getLogger(lib).setLevel(logging.INFO)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    debug_log = setup_logging(args.verbose, quiet_libraries=args.command in ("run", "validate", "sweep"))
    try:
        return args.func(args)
    except QuantkitError as exc:
        print(f"quantkit: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("quantkit: interrupted; finished stages are kept and the next run resumes after them", file=sys.stderr)
        return 130
    finally:
        _keep_debug_log(debug_log, getattr(args, "run_dir", None))


def _keep_debug_log(path: Path, run_dir: Path | None) -> None:
    """Into the run folder when the command made one; otherwise it was only scratch."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and getattr(h, "_quantkit", False)]:
        root.removeHandler(h)
        h.close()
    deepspeed = logging.getLogger("DeepSpeed")
    for f in [f for f in deepspeed.filters if isinstance(f, _ToDebugLog)]:
        deepspeed.removeFilter(f)
    try:
        if run_dir is not None and Path(run_dir).is_dir():
            from quantkit.runfolder import atomic_write_bytes

            atomic_write_bytes(Path(run_dir) / DEBUG_LOG, path.read_bytes())
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
