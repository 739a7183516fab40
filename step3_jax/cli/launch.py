"""``step3-jax launch``: a multi-process AFD command as N local processes, and the process-group
flags of ``generate`` and ``bench`` (the launcher itself: :mod:`step3_jax.runtime.launch`)."""

from __future__ import annotations

import argparse

from step3_jax.errors import Step3Error
from step3_jax.runtime import launch
from step3_jax.runtime.launch import (DEFAULT_PEER_TIMEOUT, ENV_COORDINATOR, ENV_NUM_PROCESSES,
                                      ENV_PROCESS_ID)


def add_process_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of ``generate`` and ``bench``."""
    g = p.add_argument_group(
        "multi-process AFD (attention and FFN groups in separate processes; on one machine "
        "`step3-jax launch` sets these)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="jax.distributed coordinator, process 0's address (default "
                        f"${ENV_COORDINATOR}); process 0 runs the attention group on its "
                        "devices, the others the FFN group on theirs; needs --afd")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help=f"processes in the run, >= 2 (default ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I",
                   help=f"this process, 0..N-1 (default ${ENV_PROCESS_ID})")
    g.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT, metavar="SECONDS",
                   help="fail when an awaited peer process sends nothing for this long "
                        f"(start-up, requests, transfers; default {DEFAULT_PEER_TIMEOUT:.0f})")


def add_parser(sub) -> argparse.ArgumentParser:
    la = sub.add_parser(
        "launch", help="run a multi-process AFD command as N local processes (loopback)",
        description="Start N local JAX processes running COMMAND (step3-jax generate or bench "
                    "with --afd A:F): process 0 holds the attention group, processes 1..N-1 the "
                    "FFN group. Each gets --coordinator 127.0.0.1:PORT --num-processes N "
                    "--process-id I; on CPU, D emulated devices and gloo collectives. Their "
                    "stderr is streamed with a [rank I] prefix, rank 0's stdout is forwarded. "
                    "If one process fails or dies, the others are stopped and the launch exits "
                    "non-zero naming it. On a cluster, run COMMAND once per host with these "
                    "flags instead (README).",
        usage="step3-jax launch [-h] --processes N [--devices-per-process D] [--port P] "
              "[-q] -- COMMAND ...")
    la.add_argument("--processes", type=int, required=True, metavar="N",
                    help="processes to start, >= 2 (rank 0: attention; the rest: FFN)")
    la.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                    help="emulated CPU devices per process (XLA_FLAGS="
                         "--xla_force_host_platform_device_count=D; default 1)")
    la.add_argument("--port", type=int, default=None, metavar="P",
                    help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument("-q", "--quiet", action="store_true",
                    help="only the launcher's warnings and errors (children keep their flags)")
    la.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                    help="the step3-jax subcommand and its flags, after --")
    return la


def check_command(args) -> list[str]:
    """The children's command line, validated with the real parser (``args.parse_child``, set by
    :func:`step3_jax.cli.app.build_parser`), or a one-line error."""
    if args.processes < 2:
        raise Step3Error(f"--processes must be >= 2 (attention and FFN in separate processes), "
                         f"got {args.processes}")
    if args.devices_per_process < 1:
        raise Step3Error(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if args.port is not None and not 0 < args.port < 65536:
        raise Step3Error(f"--port must be in 1..65535, got {args.port}")
    command = list(args.launched)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise Step3Error("no command: step3-jax launch --processes N -- generate --afd A:F ...")
    if command[0] not in launch.SUPPORTED:
        raise Step3Error(f"launch runs {', '.join(launch.SUPPORTED)}, got {command[0]!r}")
    for flag in ("--coordinator", "--num-processes", "--process-id"):
        if any(a == flag or a.startswith(flag + "=") for a in command):
            raise Step3Error(f"{flag} is set by launch for each process; drop it from the command")
    child = args.parse_child(command)  # a bad flag: argparse's usage error, exit 2
    if not child.afd:
        raise Step3Error("the launched command needs --afd A:F (process 0 runs the attention "
                         "group, the others the FFN group)")
    return command


def run(args) -> int:
    return launch.run(check_command(args), args.processes, args.devices_per_process, args.port)
