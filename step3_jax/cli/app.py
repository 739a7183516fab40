"""The ``step3-jax`` command line: the parser built from one module per subcommand, and
:func:`main`.

Conventions: ``--help`` on every subcommand; with ``--json`` stdout carries exactly one JSON
document and every log line or progress bar goes to stderr; a user error prints one line
``step3-jax: error: ...`` naming the culprit and exits 2, with no traceback.

Each subcommand module has ``add_parser(sub)`` and ``run(args)``; ``run`` imports what it needs
when it runs, so ``--help`` and argument errors never start JAX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from step3_jax.cli import (bench, convert, cost, estimate, export, generate, info, launch, plan,
                           score)
from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

SUBCOMMANDS = {"generate": generate, "score": score, "bench": bench, "info": info, "cost": cost,
               "estimate": estimate, "plan": plan, "convert": convert, "export": export,
               "launch": launch}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step3-jax",
        description="Step-3 (MFA attention + MoE) in pure-functional JAX: generate, score, "
                    "benchmark, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: module.add_parser(sub) for name, module in SUBCOMMANDS.items()}
    # launch validates the command it starts with this same parser
    parsers["launch"].set_defaults(parse_child=parser.parse_args)
    return parser


def _first_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:200] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("step3-jax: %(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]  # one handler on the current stderr, for this run only
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    try:
        out = SUBCOMMANDS[args.command].run(args)
    except Step3Error as e:
        print(f"step3-jax: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # jaxlib's XlaRuntimeError; an allocation the plan did not foresee
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"step3-jax: error: out of memory ({_first_line(e)}); lower --prefill-chunk, the "
              "batch or the context, or use more devices", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("step3-jax: interrupted", file=sys.stderr)
        return 130
    finally:  # an in-process caller's logging is as it was (and not bound to our stderr)
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
    if isinstance(out, int):  # launch: the launched processes' status
        return out
    if getattr(args, "json", False) and out is not None:  # None: an FFN process prints nothing
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
