"""The ``step3-jax`` command line: the parser built from one module per subcommand, and
:func:`main`.

Conventions: ``--help`` on every subcommand; with ``--json`` stdout carries exactly one JSON
document and every log line or progress bar goes to stderr; a user error (a bad flag
included) prints one line ``step3-jax: error: ...`` naming the culprit and exits 2, with no
traceback; Ctrl-C prints ``step3-jax: interrupted`` and exits 130.

Each subcommand module has ``add_parser(sub)`` and ``run(args)``; ``run`` imports what it needs
when it runs, so ``--help`` and argument errors never start JAX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from step3_jax import interrupts
from step3_jax.cli import (bench, convert, cost, estimate, export, generate, info, launch,
                           loadtest, plan, score, serve)
from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

SUBCOMMANDS = {"generate": generate, "score": score, "bench": bench, "info": info, "cost": cost,
               "estimate": estimate, "plan": plan, "convert": convert, "export": export,
               "launch": launch, "serve": serve, "loadtest": loadtest}
PROG = "step3-jax"


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: a bad flag raises :class:`Step3Error`
    (``SUBCOMMAND: MESSAGE (see step3-jax SUBCOMMAND --help)``) instead of printing the usage
    block. Sub-parsers are built with this class too (``add_subparsers`` uses the parent's)."""

    commands: dict | None = None  # the root's sub-parsers by name (build_parser)

    def error(self, message: str):
        where = self.prog.removeprefix(PROG).strip()
        raise Step3Error(f"{where + ': ' if where else ''}{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a stray argument is the subcommand's error, not the root's."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            owner = (self.commands or {}).get(getattr(ns, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Step-3 (MFA attention + MoE) in pure-functional JAX: generate, score, "
                    "benchmark, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: module.add_parser(sub) for name, module in SUBCOMMANDS.items()}
    parser.commands = parsers
    # launch validates the command it starts with this same parser
    parsers["launch"].set_defaults(parse_child=parser.parse_args)
    return parser


def _first_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:200] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``step3-jax ARGV``; the exit status.

    Without ``argv`` (the console script, ``python -m step3_jax.cli``) the process is ours: an
    interrupt ends it with status 130 through :func:`step3_jax.interrupts.end` (no interpreter
    teardown racing XLA's and orbax's threads). A caller passing ``argv`` gets 130 back.
    """
    if argv is not None:
        return _run(argv)
    interrupts.own("step3-jax: interrupted")
    return interrupts.end(_run(sys.argv[1:]))


def _run(argv: Sequence[str]) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("step3-jax: %(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]  # one handler on the current stderr, for this run only
    log.propagate = False
    try:
        args = build_parser().parse_args(argv)
        log.setLevel(logging.WARNING if args.quiet else logging.INFO)
        out = SUBCOMMANDS[args.command].run(args)
        if isinstance(out, int):  # launch: the launched processes' status (its own Ctrl-C)
            return out
        if interrupts.received():  # one a callback swallowed: the run ended, but was stopped
            raise KeyboardInterrupt
        if getattr(args, "json", False) and out is not None:  # None: an FFN process
            sys.stdout.write(json.dumps(out) + "\n")
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
        return interrupts.INTERRUPTED
    finally:  # an in-process caller's logging is as it was (and not bound to our stderr)
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
    return 0


if __name__ == "__main__":
    sys.exit(main())
