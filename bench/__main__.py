"""`python -m bench`: run the benchmark suite, print its table, and write its results."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .harness import BenchError
from .suite import FULL, MEASUREMENTS, SMOKE, Run, run, summary, write


def _clients(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected client counts like 1,16,64, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("client counts must be at least 1")
    return values


def _only(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in MEASUREMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown measurement {unknown}; choose from {', '.join(MEASUREMENTS)}")
    return names


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark llmd against llama-server alone and behind nginx.",
    )
    cli.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON to PATH")
    cli.add_argument("--markdown", type=Path, metavar="PATH", help="write the results table as Markdown to PATH")
    cli.add_argument("--smoke", action="store_true", help="a few seconds of each measurement, to check the suite works")
    cli.add_argument("--only", type=_only, default=MEASUREMENTS, metavar="NAMES",
                     help=f"comma-separated measurements to run (default: all of {','.join(MEASUREMENTS)})")
    cli.add_argument("--large-clients", type=_clients, metavar="N,N",
                     help="client counts for the large model's streaming runs (default: 1,16; "
                          "64 adds about 3 minutes per round on two cores)")
    cli.add_argument("--llama-server", type=Path, metavar="PATH", help="llama-server binary (default: the installed one)")
    cli.add_argument("--models-dir", type=Path, metavar="DIR",
                     help="where generated models are kept between runs (default: ~/.cache/llmd/bench-models)")
    cli.add_argument("--keep", action="store_true", help="keep the run's logs and configs (the path is printed)")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.large_clients:
        rounds = dict(settings.large_levels)
        levels = tuple((clients, rounds.get(clients, 2)) for clients in args.large_clients)
        settings = dataclasses.replace(settings, large_levels=levels)
    spec = Run(settings, only=args.only, llama_server=args.llama_server, models_dir=args.models_dir, keep=args.keep)
    try:
        document = run(spec)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    document["command"] = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    write(document, args.json, args.markdown)
    print(summary(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
