"""The `eft` command line.

    eft serve [--config FILE] [--grpc-port P] [--http-port P] [--metrics-port P] [--demo]
    eft generate PROMPT [--composition NAME] [--weight NAME=W ...] [--temperature T] [--seed N]
                 [--max-tokens N] [--speculate K|auto|off] [--stream] [--json] [--address HOST:PORT]
                 [--token T] [--ca-cert FILE]
    eft compositions [--address HOST:PORT] [--token T] [--ca-cert FILE]
    eft family build [--out DIR] [--seed N] [--force] [--preset demo|quick|bpe]
    eft eval [--family DIR] [--json FILE] [--plot FILE.png] [--sample N] [--limit N]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from eft_core import EFTError
from services.progress import quiet_library_bars


def main(argv: list[str] | None = None) -> int:
    quiet_library_bars()
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
    build.add_argument("--out", type=Path, default=None, help=f"family folder (default: {default_family_dir()}, {default_family_dir('bpe-family')} for --preset bpe; EFT_HOME moves them)")
    build.add_argument("--seed", type=int, default=0, help="training seed: same seed, same weights at the same thread count (default: %(default)s)")
    build.add_argument("--force", action="store_true", help="rebuild even if a family with this recipe exists")
    build.add_argument(
        "--preset",
        choices=("demo", "quick", "bpe"),
        default="demo",
        help="demo: the full family (about 5 minutes on 2 cores); quick: a reduced family for smoke tests, built in seconds; "
        "bpe: the quick family with a byte-level BPE tokenizer, ChatML chat turns and multilingual text, base models "
        "without a chat template (as Qwen or Llama-3 checkpoints), built in seconds",
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

    serve = commands.add_parser(
        "serve",
        help="serve compositions over gRPC and HTTP on a local Ray cluster (or a running one)",
        description="Start a local Ray cluster bound to 127.0.0.1 (or attach to a running one: --address) and deploy the "
        "configuration (default: the demo family, built if absent, with its compositions; `upscaled` is the default). Serves until Ctrl-C.",
    )
    serve.add_argument("--config", type=Path, help="YAML serving configuration (see README); default: the demo family")
    serve.add_argument("--grpc-port", type=_port, default=None, help="public gRPC port (default: the config's, 50051)")
    serve.add_argument("--http-port", type=_port, default=None, help="OpenAI-compatible HTTP port (default: the config's, 8000)")
    serve.add_argument("--metrics-port", type=_port, default=None, help="Prometheus scrape port, /metrics (default: the config's, 9464)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--num-cpus", type=_positive, default=None, help="CPUs for the local Ray cluster (default: all)")
    where.add_argument(
        "--address", default=None, metavar="auto|HOST:PORT",
        help="attach to a running Ray cluster instead of starting one: auto (the one this machine runs, e.g. after `ray start --head`) "
        "or its GCS address; Ctrl-C then deletes this application and leaves the cluster running",
    )  # fmt: skip
    serve.add_argument("--demo", action="store_true", help="once ready, stream one demo request and print it")
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="ask a running server for a completion (gRPC client)", description="Send one request to EFTService.")
    generate.add_argument("prompt", help="the user message (or plain text with --text)")
    generate.add_argument("--text", action="store_true", help="send PROMPT as plain text instead of a chat message")
    generate.add_argument("--composition", default="", help="composition name (default: the server's default)")
    generate.add_argument("--weight", action="append", default=[], metavar="NAME=W", help="per-request delta weight (repeatable)")
    generate.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: 1)")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    generate.add_argument("--seed", type=_bounded(0, 2**64 - 1), default=None, help="same seed, same output (0 to 2^64 - 1)")
    generate.add_argument("--max-tokens", type=_bounded(1, 2**31 - 1), help="tokens at most (default: the server's)")
    generate.add_argument("--speculate", default="default", metavar="K|auto|off", help="drafts per step, auto (adaptive) or off (default: the server's)")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.add_argument("--json", action="store_true", help="print the final response as one JSON object")
    _connection_arguments(generate)
    generate.set_defaults(run=_generate)

    listing = commands.add_parser("compositions", help="list a running server's compositions")
    _connection_arguments(listing)
    listing.set_defaults(run=_compositions)

    drain = commands.add_parser(
        "drain",
        help="drain the gateway on this machine (a pod's preStop hook)",
        description="Ask the gateway whose scrape port is PORT on 127.0.0.1 to drain: health turns NOT_SERVING, its public ports take no new "
        "connection and send open ones elsewhere (GOAWAY, Connection: close), and this waits until its running requests have finished (or --timeout passes).",
    )  # fmt: skip
    drain.add_argument("--metrics-port", type=_port, default=9464, help="the gateway's scrape port (default: %(default)s)")
    drain.add_argument("--timeout", type=float, default=300.0, help="seconds to wait at most (default: %(default)s, the default drain_timeout_s)")
    drain.set_defaults(run=_drain)
    return parser


def _connection_arguments(command) -> None:
    command.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address (default: %(default)s)")
    command.add_argument("--token", default=os.environ.get("EFT_TOKEN"), help="bearer token, for a server with auth (default: $EFT_TOKEN)")
    command.add_argument("--ca-cert", default=None, metavar="FILE", help="PEM CA certificate to trust: connect over TLS")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def _port(text: str) -> int:
    return _bounded(0, 65535)(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _family_build(args) -> int:
    from services.family.build import build_family
    from services.family.recipe import Recipe, bpe_recipe, default_family_dir, quick_recipe

    recipe = {"quick": quick_recipe, "bpe": bpe_recipe}.get(args.preset, lambda seed: Recipe(seed=seed))(args.seed)
    out = args.out or default_family_dir("bpe-family" if args.preset == "bpe" else "demo-family")
    build_family(out, recipe, force=args.force)
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


def _serve(args) -> int:
    from cluster.serve_command import serve_until_interrupted

    ports = {"grpc_port": args.grpc_port, "http_port": args.http_port, "metrics_port": args.metrics_port}
    return serve_until_interrupted(args.config, ports, args.num_cpus, args.demo, args.address)


def _generate(args) -> int:
    from cluster.client import generate_command

    return generate_command(args)


def _drain(args) -> int:
    from cluster.client import drain_command

    return drain_command(args.metrics_port, args.timeout)


def _compositions(args) -> int:
    from cluster.client import compositions_command

    return compositions_command(args)


if __name__ == "__main__":
    sys.exit(main())
