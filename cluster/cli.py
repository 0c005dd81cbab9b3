"""The `eft` command line.

    eft family build [--out DIR] [--seed N] [--force] [--preset demo|quick]
    eft eval [--family DIR] [--json FILE] [--plot FILE.png] [--sample N] [--limit N]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from eft_core import EFTError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (EFTError, FileNotFoundError, FileExistsError) as error:
        print(f"eft: error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from services.family.recipe import default_family_dir

    parser = argparse.ArgumentParser(prog="eft", description="EFT Serve: emulated fine-tuning, served.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    family = commands.add_parser("family", help="the demo model family (trained here, offline)")
    family_commands = family.add_subparsers(title="family commands", metavar="COMMAND")
    build = family_commands.add_parser(
        "build",
        help="train and save the demo family",
        description="Train the demo family (small-base, small-tuned, small-safe, large-base, large-tuned) on the CPU "
        "and save each model as a Hugging Face folder. An existing family with the same recipe is reused.",
    )
    build.add_argument("--out", type=Path, default=default_family_dir(), help="family folder (default: %(default)s; EFT_HOME moves it)")
    build.add_argument("--seed", type=int, default=0, help="training seed: same seed, same weights at the same thread count (default: %(default)s)")
    build.add_argument("--force", action="store_true", help="rebuild even if a family with this recipe exists")
    build.add_argument(
        "--preset",
        choices=("demo", "quick"),
        default="demo",
        help="demo: the full family (about 3 minutes on 2 cores); quick: a reduced family for smoke tests, built in seconds",
    )
    build.set_defaults(run=_family_build)

    evaluate = commands.add_parser(
        "eval",
        help="reproduce the EFT paper's up-scaling and mixing results on the demo family",
        description="Greedy answers to every entity/attribute question for small-tuned, large-base, large-tuned and "
        "up-scaled (weights 1 and 1.5), plus the helpful/safe mixing sweep; prints a table.",
    )
    evaluate.add_argument("--family", type=Path, default=default_family_dir(), help="family folder (default: %(default)s)")
    evaluate.add_argument("--json", type=Path, help="write the results as JSON to this file")
    evaluate.add_argument("--plot", type=Path, help="write a PNG plot (mixing trade-off and up-scaling bars)")
    evaluate.add_argument("--sample", type=_count, default=0, metavar="N", help="add temperature-1 sampling rows over N questions")
    evaluate.add_argument("--limit", type=_positive, default=None, metavar="N", help="only the first N entities (default: all)")
    evaluate.set_defaults(run=_eval)
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _family_build(args) -> int:
    from services.family.build import build_family
    from services.family.recipe import Recipe, quick_recipe

    recipe = quick_recipe(args.seed) if args.preset == "quick" else Recipe(seed=args.seed)
    build_family(args.out, recipe, force=args.force)
    return 0


def _eval(args) -> int:
    from services.family.build import load_family
    from services.family.evaluate import evaluate

    started = time.perf_counter()
    results = evaluate(load_family(args.family), limit=args.limit, sample=args.sample)
    print(f"mean TV(small-tuned, upscaled) along upscaled greedy answers: {results['upscaled_small_tuned_mean_tv']:.3f}")
    print(f"evaluated {results['questions']} questions in {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from services.family.plot import plot_results

        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
