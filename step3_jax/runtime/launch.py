"""``step3-jax launch``: a multi-process run on this machine, and a process's place in one.

``step3-jax launch --processes N [--devices-per-process D] -- generate --afd A:F ...`` starts N
copies of the command as separate JAX processes on loopback (``--coordinator 127.0.0.1:PORT
--num-processes N --process-id I`` added to each; on CPU, D emulated devices each and gloo
collectives), streams their stderr with a ``[rank I]`` prefix and forwards rank 0's stdout (the
attention process prints the results, so ``--json`` stays one JSON document). If any process
exits non-zero or dies, the others are stopped (SIGTERM, then SIGKILL: JAX's preemption notifier
catches SIGTERM) and the launcher exits non-zero naming the rank. Ctrl-C stops them all.

No JAX here: the launcher itself never starts a JAX runtime.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_PEER_TIMEOUT = 600.0
SUPPORTED = ("generate", "bench")
STOP_GRACE = 3.0      # seconds between SIGTERM and SIGKILL when stopping the others
EXIT_GRACE = 90.0     # seconds the others may take to exit after one finished cleanly
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


class ProcessGroup:
    """Where this process sits in a multi-process run."""

    def __init__(self, coordinator: str, num_processes: int, process_id: int):
        self.coordinator, self.num_processes, self.process_id = (coordinator, num_processes,
                                                                 process_id)

    @property
    def role(self) -> str:
        return "attention" if self.process_id == 0 else "ffn"

    def __repr__(self) -> str:
        return (f"ProcessGroup({self.coordinator!r}, num_processes={self.num_processes}, "
                f"process_id={self.process_id})")


def process_group(args, afd: bool, environ: Mapping[str, str] = os.environ) -> ProcessGroup | None:
    """The group from ``--coordinator/--num-processes/--process-id``, each defaulting to the
    usual JAX environment variable (read only with ``--afd``); None for a single process."""
    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(f is not None for f in flags) and not afd:
        raise Step3Error("--coordinator/--num-processes/--process-id need --afd A:F (process 0 "
                         "runs the attention group, the others the FFN group)")
    if not afd:
        return None
    coordinator = args.coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes, process_id = args.num_processes, args.process_id
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise Step3Error("--num-processes/--process-id need --coordinator HOST:PORT "
                             f"(or ${ENV_COORDINATOR})")
        return None
    if num_processes is None:
        num_processes = _env_int(environ, ENV_NUM_PROCESSES, "--num-processes")
    if process_id is None:
        process_id = _env_int(environ, ENV_PROCESS_ID, "--process-id")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Step3Error(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 2:
        raise Step3Error("--num-processes must be >= 2 (attention and FFN in separate "
                         f"processes), got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise Step3Error(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    if not args.peer_timeout > 0:
        raise Step3Error(f"--peer-timeout must be > 0, got {args.peer_timeout}")
    return ProcessGroup(coordinator, num_processes, process_id)


def _env_int(environ, name: str, flag: str) -> int:
    if not environ.get(name):
        raise Step3Error(f"--coordinator needs {flag} (or ${name})")
    try:
        return int(environ[name])
    except ValueError:
        raise Step3Error(f"${name} must be an integer, got {environ[name]!r}") from None


# ----- the launcher ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, environ: Mapping[str, str] = os.environ) -> dict:
    env = {k: v for k, v in environ.items()
           if k not in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
    flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Streams:
    """Copies each child's stderr (and the stdout of ranks > 0) line by line to our stderr with
    a rank prefix, and rank 0's stdout verbatim to ours."""

    def __init__(self):
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def follow(self, pipe, rank: int, verbatim: bool) -> None:
        def run():
            out = sys.stdout if verbatim else sys.stderr
            for raw in iter(pipe.readline, b""):
                line = raw.decode(errors="replace")
                if not verbatim and "\r" in line:  # a progress bar's redraws: keep its last state
                    line = next((seg for seg in reversed(line.rstrip("\n").split("\r"))
                                 if seg.strip()), "") + "\n"
                    if not line.strip():
                        continue
                with self.lock:
                    out.write(line if verbatim else f"[rank {rank}] {line}")
                    if not line.endswith("\n"):
                        out.write("\n")
                    out.flush()
            pipe.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))


def _stop(procs: Sequence[subprocess.Popen], sig=signal.SIGTERM) -> None:
    """Stop the still-running children (each by its pid): ``sig``, then SIGKILL."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
    end = time.monotonic() + STOP_GRACE
    for p in running:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for p in running:
        p.wait()


class _Terminated(Exception):
    """The launcher got SIGTERM."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _die_with_parent() -> None:
    """In a child, before exec: get SIGKILL if the launcher dies (Linux ``PR_SET_PDEATHSIG``),
    so no process outlives a launcher that was killed outright."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run(command: Sequence[str], processes: int, devices_per_process: int = 1,
        port: int | None = None) -> int:
    """Launch ``processes`` copies of the step3-jax ``command`` (validated by the CLI, without
    the process-group flags, which are added here), stream their output, supervise them; the
    exit status of the whole run."""
    n = processes
    port = port or free_port()
    env = child_env(devices_per_process)
    procs: list[subprocess.Popen] = []
    streams = _Streams()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        for rank in range(n):  # every child started before any reader thread (preexec_fn)
            argv = [sys.executable, "-m", "step3_jax.cli", *command,
                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                    "--process-id", str(rank)]
            procs.append(subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
        for rank, p in enumerate(procs):
            streams.follow(p.stderr, rank, verbatim=False)
            streams.follow(p.stdout, rank, verbatim=rank == 0)
        log.info("launched %d processes on 127.0.0.1:%d, %d device(s) each: %s", n, port,
                 devices_per_process,
                 ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(procs)))
        failed, first_done = None, None
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if bad:  # a process killed by a signal is the likelier cause of the others' exits
                failed = min(bad, key=lambda rc: (rc[1] > 0, rc[0]))
                break
            if all(c == 0 for c in codes):
                break
            if first_done is None and any(c == 0 for c in codes):
                first_done = time.monotonic()
            if first_done is not None and time.monotonic() - first_done > EXIT_GRACE:
                stuck = [r for r, c in enumerate(codes) if c is None]
                failed = (stuck[0], None)
                break
            time.sleep(0.1)
    except (KeyboardInterrupt, _Terminated) as e:
        _stop(procs, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        streams.join(5.0)
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"step3-jax: {what}; stopped every process", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except BaseException:
        _stop(procs)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failed is None:
        streams.join(30.0)
        return 0
    rank, code = failed
    others = [r for r, p in enumerate(procs) if p.poll() is None]
    _stop(procs)
    streams.join(5.0)
    what = (_describe(code) if code is not None
            else f"did not exit within {EXIT_GRACE:.0f} s after another process finished")
    stopped = f"; stopped rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}" \
        if others else ""
    print(f"step3-jax: error: rank {rank} {what}{stopped}", file=sys.stderr, flush=True)
    return code if code is not None and code > 0 else 1
