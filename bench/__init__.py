"""llmd's benchmark suite: what the daemon adds on top of the engines it runs.

Run it from the repository root with the project's environment::

    .venv/bin/python -m bench --json out.json          # the full run, a few minutes
    .venv/bin/python -m bench --smoke --json out.json  # a few seconds: checks the suite works

It measures, against real llama-server engines on generated models: proxy overhead on small
requests, streaming throughput and inter-chunk delay, cold-start and swap overhead, a long
conversation's next turn after its model was swapped out and back (with and without a saved
prompt cache), placement decision time, and the daemon's own footprint. Each figure is
measured in the same run as its baselines (the engine alone, and nginx in front of the same
engine when nginx is installed), interleaved, and repeated so that its spread shows.
`docs/benchmarks.md` explains the figures and holds the latest results.
"""

from .suite import FULL, MEASUREMENTS, SMOKE, Run, Settings, run

__all__ = ["FULL", "MEASUREMENTS", "SMOKE", "Run", "Settings", "run"]
