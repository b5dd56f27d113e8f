"""The `effft` command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import time
import warnings
from typing import Callable, Sequence

from rich.markup import escape

from .console import console, err_console
from .errors import EffftError, Interrupted, user_error

log = logging.getLogger("effft")


def _models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .model.registry import VARIANTS, known_tags, parameter_count

    table = Table(title="EfficientNet variants (timm's names; weights from the Hugging Face hub under timm/)")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("resolution", justify="right")
    table.add_column("known weight tags")
    for name, variant in VARIANTS.items():
        tags = ", ".join(known_tags(name)) or "-"
        table.add_row(name, f"{parameter_count(name) / 1e6:.1f}M", str(variant.resolution), tags)
    console.print(table)
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .config.load import load_recipe
    from .runs.fit import fit

    if args.resume and args.overwrite:
        parser_error("--resume and --overwrite exclude each other: continue the run, or start it again")
    if args.resume and args.find_lr:
        parser_error("--find-lr picks the learning rate of a new run; a resumed run keeps its own: drop --find-lr")
    recipe = load_recipe(args.recipe, args.set)
    # the command line to give again, to resume or restart the run (the same --set, or a resume is refused)
    command = shlex.join(["effft", "fit", args.recipe, *[a for kv in args.set for a in ("--set", kv)]])
    from .runs.budget import process_age

    # trainer.budget counts the whole command, from the start of the process
    fit(recipe, resume=args.resume, overwrite=args.overwrite, find_lr=args.find_lr, quiet=args.quiet,
        command=command, started=time.perf_counter() - process_age())
    return 0


def _cv(args: argparse.Namespace) -> int:
    from .config.load import load_recipe
    from .runs.cv import cross_validate

    recipe = load_recipe(args.recipe, args.set)
    command = shlex.join(["effft", "cv", args.recipe, "--folds", str(args.folds),
                          *[a for kv in args.set for a in ("--set", kv)]])
    cross_validate(recipe, folds=args.folds, quiet=args.quiet, overwrite=args.overwrite, command=command)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .config.load import load_recipe
    from .config.trainer import seconds
    from .runs.tune import tune

    budget = None
    if args.budget is not None:
        budget = seconds(args.budget)
        if budget is None or budget <= 0:
            parser_error(f"--budget {args.budget!r}: expected a time such as 30m, 1h30m, 90s or 600 (seconds)")
    recipe = load_recipe(args.recipe, args.set)
    tune(recipe, source=args.recipe, trials=args.trials, budget=budget, storage=args.storage, pruner=args.pruner,
         quiet=args.quiet)
    return 0


def _test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runs.test import test

    test(Path(args.run), overrides=args.set, quiet=args.quiet)
    return 0


def _info(args: argparse.Namespace) -> int:
    import yaml
    from rich.syntax import Syntax
    from rich.table import Table

    from .config.load import load_recipe
    from .runs.build import build_inputs, check_fit_plan, recipe_weights

    recipe = load_recipe(args.recipe, args.set)
    console.print(Syntax(yaml.safe_dump(recipe.to_dict(), sort_keys=False), "yaml", theme="ansi_dark"))
    inputs = build_inputs(recipe, weights=recipe_weights(recipe), progress=not args.quiet)
    spec, summary = inputs.spec, inputs.data.summary()
    table = Table(title=f"{summary['adapter']} data at {summary['root']} ({summary['task']})")
    table.add_column("class")
    for split in ("train", "val", "test"):
        table.add_column(f"{split} ({summary['items'][split]})", justify="right")
    for cls in summary["classes"]:
        table.add_row(cls, *(str(summary["counts"][s].get(cls, 0)) for s in ("train", "val", "test")))
    console.print(table)
    sizes = summary["image_size"]
    if sizes.get("sampled"):
        console.print(f"image sizes ({sizes['sampled']} sampled): width {sizes['width']['min']}..{sizes['width']['max']}, "
                      f"height {sizes['height']['min']}..{sizes['height']['max']}", markup=False)
    console.print(f"bad files: {len(summary['bad_files'])}", markup=False)
    for bad in summary["bad_files"][:20]:
        console.print(f"  {bad['path']}: {bad['reason']}", highlight=False, markup=False)
    console.print(f"model: {recipe.model.arch}, {inputs.data.num_classes} classes, weights: {inputs.weights}, "
                  f"input {spec.size} px, mean {spec.mean}, std {spec.std}", markup=False)
    check_fit_plan(recipe, inputs.data, image_size=spec.size)  # what `effft fit` would refuse once the data is known
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .device import pick_device
    from .model.registry import get_variant

    args.device = str(pick_device(args.device))  # auto decided, a GPU that is not there refused: once, here

    if args.part == "quality":
        if not args.recipe:
            parser_error("effft bench quality needs a recipe: effft bench quality RECIPE [--set key=value ...]")
        from .bench.quality import run_quality_bench

        return run_quality_bench(args)
    if args.part == "intervals":
        from .bench.intervals import run_intervals_bench

        return run_intervals_bench(args)
    if args.part == "fit" and args.recipe:
        from .bench.fit import run_recipe_fit_bench

        return run_recipe_fit_bench(args)
    if args.recipe:
        parser_error(f"effft bench {args.part} takes no recipe (only bench quality and bench fit do)")
    get_variant(args.model)  # an unknown name: the error with close matches, before any work
    if args.part in ("model", "data", "fit"):
        from .bench.memory import check_fits

        check_fits(args)  # sizes the machine cannot hold: said now, not as an allocation error later
    if args.part == "data":
        from .bench.data import run_data_bench

        return run_data_bench(args)
    if args.part == "fit":
        from .bench.fit import run_fit_bench

        return run_fit_bench(args)
    if args.part == "predict":
        from .bench.predict import run_predict_bench

        return run_predict_bench(args)
    from .bench.model import run_model_bench

    return run_model_bench(args)


def _predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infer.predict import predict

    predict(Path(args.run), args.paths, out=Path(args.out), top_k=args.top_k, tta=args.tta,
            batch_size=args.batch_size, progress=not args.quiet, engine=args.engine,
            onnx=Path(args.onnx) if args.onnx else None, workers=args.workers, device=args.device,
            precision=args.precision, compile=args.compile)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out) if args.out else None
    if args.format == "timm":
        from .infer.timm_folder import export_timm

        if args.calibration_images is not None:
            raise EffftError("--calibration-images is for --format onnx-int8, not --format timm")

        export_timm(Path(args.run), out=out)
        return 0
    from .infer.export import export

    export(Path(args.run), fmt=args.format, out=out, calibration=args.calibration_images)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infer.explain import explain

    explain(Path(args.run), args.paths, class_name=args.class_name, out=Path(args.out) if args.out else None,
            batch_size=args.batch_size, progress=not args.quiet, workers=args.workers, device=args.device)
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infer.gallery import enroll

    enroll(Path(args.run), Path(args.people), out=Path(args.out), update=args.update)
    return 0


def _identify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infer.gallery import identify

    identify(Path(args.run), Path(args.gallery), args.paths, out=Path(args.out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infer.gallery import verify

    verify(Path(args.run), Path(args.a), Path(args.b))
    return 0


def parser_error(message: str) -> None:
    from .errors import RecipeError

    raise RecipeError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effft",
        description="Fine-tune EfficientNet on your own images. Start with `effft models`, "
        "or `effft fit recipes/quickstart.yaml`.",
    )
    _global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the model variants, their size, resolution and known weights")
    p.set_defaults(func=_models)

    set_help = "override a recipe key, typed by the recipe schema, e.g. --set data.batch_size=64 (repeatable)"
    p = sub.add_parser("fit", help="train, validate and test as a recipe says; writes a run directory",
                       description="Fine-tune as RECIPE says. The run directory is <output_dir>/<name>/.")
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory of this name first")
    p.add_argument("--find-lr", action="store_true", help="run the learning-rate finder first, plot it, train with its pick")
    p.set_defaults(func=_fit)

    p = sub.add_parser("cv", help="k-fold cross-validation: every fold, pooled out-of-fold figures, the ensemble",
                       description="Run every fold of RECIPE (the test split shared; fold k trains on K-2 parts, "
                       "validates on part k+1, and predicts part k, which it never saw). Folds go to "
                       "<output_dir>/<name>/fold-<k>/; give the command again to finish an interrupted one.")
    p.add_argument("recipe", help="a YAML recipe")
    p.add_argument("--folds", type=int, default=5, help="how many folds (at least 3; default 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--overwrite", action="store_true", help="run every fold again, finished ones included")
    p.set_defaults(func=_cv)

    p = sub.add_parser("tune", help="search hyper-parameters with Optuna; resumable, shared through its storage",
                       description="Search the recipe's tune: section (or the default space) with short fits, "
                       "judged on val; the best trial is tested once and written as best.yaml. The study is "
                       "kept in <output_dir>/<name>/tune.db: give the command again to resume it, or run it in "
                       "several processes at once to share it.")
    p.add_argument("recipe", help="a YAML recipe (its tune: section says what to search)")
    p.add_argument("--trials", type=_at_least(1), default=None,
                   help="finished trials the study should have (default 20, or no limit with --budget)")
    p.add_argument("--budget", default=None, metavar="TIME",
                   help="start no new trial after this long, e.g. 30m (a running trial finishes)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL (default sqlite:///<run dir>/tune.db); postgresql://... to "
                   "share a study across machines")
    p.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                   help="stop trials early on their val figure per epoch (default median)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_tune)

    p = sub.add_parser("test", help="re-evaluate a finished run, optionally on other data",
                       description="Evaluate the best checkpoint of a run on its test split, or on other data "
                       "given with --set data.root=... (then every image there is evaluated).")
    p.add_argument("run", help="a run directory (runs/<name>) or a .ckpt file written by effft fit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_test)

    p = sub.add_parser("info", help="check a recipe and summarise its data, without training")
    p.add_argument("recipe", help="a YAML recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="measure our speed against the reference implementation")
    count = _at_least(1)
    p.add_argument("part", choices=["model", "data", "fit", "quality", "intervals", "predict"],
                   help="model: forward and forward+backward against timm; data: the train pipeline from files "
                   "and from the cache; fit: a training epoch against a plain Lightning loop around timm's model; "
                   "quality: effft fit of a recipe against the plain loop a user writes, on the same split; intervals: "
                   "the bootstrap of the test figures against a scikit-learn loop over the resamples; predict: "
                   "effft predict from JPEG files to the CSV against the model's own forward on ready batches")
    p.add_argument("recipe", nargs="?", default=None, help="quality: the recipe to run; fit: a recipe whose "
                   "training epoch to measure against the bare steps of its batches (else --root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="quality, fit: " + set_help)
    p.add_argument("--out", default=None, help="quality: a folder to keep both runs in (default: a temporary one)")
    p.add_argument("--json", default=None, help="quality: also write the figures to this JSON file")
    p.add_argument("--model", default="efficientnet_b0", help="model name (default: %(default)s)")
    p.add_argument("--batch-size", type=count, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--image-size", type=_at_least(16), default=224, help="input size in pixels (default: %(default)s)")
    p.add_argument("--rounds", type=count, default=6, help="timed rounds of each, alternating (default: %(default)s)")
    p.add_argument("--iters", type=count, default=3, help="batches per timed round (default: %(default)s)")
    p.add_argument("--threads", type=count, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", type=_device, default="cpu", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    p.add_argument("--compile", action="store_true",
                   help="model, predict: also time the folded model through torch.compile (compiled before the "
                   "timed rounds)")
    p.add_argument("--root", default=None, help="data: a folder of class folders to measure too (e.g. your JPEGs)")
    p.add_argument("--large", type=_at_least(0), default=24, help="data: how many 2000 px JPEGs to generate (default: %(default)s)")
    p.add_argument("--limit", type=count, default=200,
                   help="data: images timed per set; predict: JPEGs predicted per round "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=_at_least(0), default=None,
                   help="fit: data loader workers for both (default 1); predict: predict's --workers "
                   "(default: its own)")
    p.add_argument("--predictions", type=count, default=10000, help="intervals: predictions (default: %(default)s)")
    p.add_argument("--resamples", type=count, default=2000, help="intervals: bootstrap resamples (default: %(default)s)")
    p.set_defaults(func=_bench)
    device_help = ("where the model runs: auto (a CUDA GPU where there is one, else the CPU), cpu, cuda or cuda:N "
                   "(default: %(default)s)")
    workers_help = ("processes reading and preparing the images while the model runs; 0 reads them in this "
                    "one (default: none for a single batch, else up to 4, one core left to the model)")
    p = sub.add_parser("predict", help="predict image files and folders with a trained run; writes a CSV",
                       description="Predict every image in PATHS (files, and folders searched recursively) "
                       "with the run's eval preprocessing. Unreadable files are listed in the CSV's error column. "
                       "Rows are written as each batch is predicted, to OUT.partial, renamed to OUT once every "
                       "file has its row: an interrupted or killed predict leaves no OUT, and OUT.partial with "
                       "the rows of the batches done.")
    p.add_argument("run", help="a run directory (runs/<name>) or a .ckpt file written by effft fit")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--out", required=True, help="the CSV to write, e.g. preds.csv")
    p.add_argument("--top-k", type=int, default=5, help="multiclass: labels per image (default: %(default)s)")
    p.add_argument("--tta", choices=["none", "flip", "multicrop"], default=None,
                   help="test-time augmentation: average over the image and its mirror (flip), or over the "
                   "centre crop, its mirror and four corner crops (multicrop) (default: the run's own, "
                   "its recipe's metrics.tta)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                   help="torch: the run's model; onnxruntime: its ONNX export (default: %(default)s)")
    p.add_argument("--onnx", default=None, help="onnxruntime: the exported file (default: RUN/export/model.onnx)")
    p.add_argument("--workers", type=_at_least(0), default=None, help=workers_help)
    p.add_argument("--device", type=_device, default="auto", help=device_help)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the model under bfloat16 autocast, on a GPU only (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch engine: run the model through torch.compile, compiled once for --batch-size "
                   "before any file is read. Compiling takes tens of seconds, so it pays off on large folders; "
                   "effft bench predict --compile measures it on this machine")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a trained run as ONNX (fp32 or int8), torch.export, a timm folder or "
                       "TorchScript, checked against PyTorch",
                       description="Export the run's model (any batch size, the run's input size) and write its "
                       "preprocessing beside it as JSON. The export is compared with PyTorch before it is kept. "
                       "onnx-int8 quantises the fp32 ONNX model with ONNX Runtime, calibrated on the run's train "
                       "images, and writes its agreement with fp32, the accuracy of both and their speed against "
                       "timm's eager forward, measured on the test split, to <file>.check.json.")
    p.add_argument("run", help="a run directory (runs/<name>) or a .ckpt file written by effft fit")
    p.add_argument("--format", choices=["onnx", "onnx-int8", "pt2", "timm", "torchscript"], required=True,
                   help="the file format; onnx-int8: static int8 quantisation (needs the run's data); timm: a "
                   "folder timm and the Hugging Face hub read as it is")
    p.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="onnx-int8: train images to calibrate on, chosen at random with the recipe's seed "
                   "(default: 200)")
    p.add_argument("--out", default=None,
                   help="the file to write (default: <run>/export/model.onnx or .pt; for a .ckpt given, "
                   "<run>/export/<its name>.onnx when it is a run's, else beside it)")
    p.set_defaults(func=_export)

    p = sub.add_parser("explain", help="Grad-CAM heat maps of a trained run over images, as PNG overlays",
                       description="For every image in PATHS (files, and folders searched recursively), a PNG of "
                       "the eval-preprocessed image with the Grad-CAM map of the last stage over it, for the "
                       "predicted class or --class, and explain.csv listing them (and unreadable files).")
    p.add_argument("run", help="a run directory (runs/<name>) or a .ckpt file written by effft fit")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="explain this class (default: the predicted class; multilabel: each label predicted "
                   "present, or the top one where none is)")
    p.add_argument("--out", default=None, help="the folder to write (default: <run>/explain/)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--workers", type=_at_least(0), default=None, help=workers_help)
    p.add_argument("--device", type=_device, default="auto", help=device_help)
    p.set_defaults(func=_explain)
    run_help = "a run directory (runs/<name>) or a .ckpt file of an embedding run (task: embedding)"
    p = sub.add_parser("enroll", help="enrol people (a folder per person) into a gallery with an embedding run",
                       description="Embed every photo of PEOPLE/<name>/ with the run and write the gallery: each "
                       "person's mean embedding, each photo's, and the run's threshold. Written whole or not at all.")
    p.add_argument("run", help=run_help)
    p.add_argument("people", help="a folder with one sub-folder of photos per person, e.g. people/alice/1.jpg")
    p.add_argument("--out", required=True, help="the gallery to write, e.g. gallery.npz")
    p.add_argument("--update", action="store_true",
                   help="add or replace these people in the existing gallery; everyone else is kept as they were")
    p.set_defaults(func=_enroll)

    p = sub.add_parser("identify", help="name the person in each photo from a gallery; writes a CSV",
                       description="For every photo in PATHS: the best person of the gallery, the similarity and "
                       "the runner-up; 'unknown' under the gallery's threshold, 'no_face' where no face was found, "
                       "'unreadable' for files that cannot be read.")
    p.add_argument("run", help=run_help)
    p.add_argument("gallery", help="a gallery written by effft enroll with this run")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--out", required=True, help="the CSV to write, e.g. ids.csv")
    p.set_defaults(func=_identify)

    p = sub.add_parser("verify", help="are two photos the same person? the similarity and the run's answer",
                       description="The cosine similarity of the faces of two photos, and 'same person' where it "
                       "reaches the threshold the run chose on val, else 'different people' (exit 0 for both).")
    p.add_argument("run", help=run_help)
    p.add_argument("a", help="an image file")
    p.add_argument("b", help="another image file")
    p.set_defaults(func=_verify)
    for command in sub.choices.values():  # `effft fit r.yaml -q` as well as `effft -q fit r.yaml`
        _global_flags(command, default=argparse.SUPPRESS)
    return parser


def _global_flags(parser: argparse.ArgumentParser, *, default: object) -> None:
    # A subcommand's flags default to SUPPRESS: left out after the subcommand, they keep what was
    # given before it (argparse copies every value the subcommand's parser sets over the main one's).
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="print only warnings, errors and the result")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="print debugging details")


def _setup_logging(args: argparse.Namespace) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # matplotlib says at INFO that it built its font cache (once per machine): nothing for a user
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # torch's ONNX exporter passes (onnxscript, onnx_ir) narrate each rewrite at INFO
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's own use of a torch API that newer torch releases deprecate: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low` (argparse reports a bad one, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}, the smallest allowed")
        return value
    return parse


def _device(text: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda or cuda:N")


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, turn user errors into one message and an exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except (EffftError, OSError, KeyboardInterrupt) as exc:
        message, code = user_error(exc)  # type: ignore[misc]
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):  # not an error: what was left, and how to go on
            err_console.print(message, highlight=False, markup=False, soft_wrap=True)
        else:
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
        return code


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
