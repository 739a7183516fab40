"""Ctrl-C (issue 17): one line ``step3-jax: interrupted``, exit 130, nothing half-written, no
crash at exit, no thread tracebacks.

The signal cases run in a subprocess (the real handler, the real exit): either ``step3-jax``
itself, signalled from outside once a marker line is on stderr, or the CLI's ``main`` with one
function wrapped to signal the process at an exact point (inside a chunk's orbax save, just
after the commit), which no outside timing can hit reliably.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from step3_jax import interrupts
from step3_jax.checkpoint import store
from step3_jax.checkpoint.hub import load_hub
from step3_jax.checkpoint.loader import load

INTERRUPTED_LINE = "step3-jax: interrupted"
WAIT_S = 120  # the bound on every wait for a child (they take a few seconds)


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """This process's SIGINT under Python's own handler for each test, as in a terminal, and
    restored after. An xdist worker ignores SIGINT (its controller handles Ctrl-C), and an
    ignored signal stays ignored across exec; a handled one is reset to the default there, so
    the children started here install Python's handler too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv],
                          capture_output=True, text=True, timeout=WAIT_S)


# ----- the module, in this process ------------------------------------------------------------

def test_deferred_holds_a_sigint_until_the_section_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it must not have raised
            done.append("body")
    assert done == ["body"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_sigint_inside_a_deferred_section_raises_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("after the second")
    assert reached == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_is_a_no_op_outside_the_main_thread():
    errors = []

    def body():
        try:
            with interrupts.deferred():
                pass
        except Exception as e:  # signal.signal would raise ValueError here
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(WAIT_S)
    assert errors == []


# ----- an owned process -------------------------------------------------------------------------

def test_an_interrupt_a_gc_callback_swallowed_is_sent_again():
    """Python cannot raise from a garbage-collection callback (JAX runs one at every
    collection): the interrupt is printed as "Exception ignored" and lost. The owned process
    sends it again, and it lands in ordinary code, silently."""
    proc = _python("""
        import gc, os, signal, sys, time
        from step3_jax import interrupts

        interrupts.own("interrupted")
        fired = []
        def callback(phase, info):
            if not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))  # bytecode: the handler runs here, inside the callback
        gc.callbacks.append(callback)
        gc.collect()
        assert fired and interrupts.received()
        try:
            time.sleep(5)
        except KeyboardInterrupt:
            print("raised again")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "raised again"
    assert proc.stderr == ""  # no "Exception ignored in" traceback


def _signal_at_marker(argv: list[str], marker: str, delay: float = 0.0):
    """Run ``python -m step3_jax.cli ARGV``; SIGINT it ``delay`` s after ``marker`` is on
    stderr. ``(exit status, stdout, stderr lines)``."""
    proc = subprocess.Popen([sys.executable, "-m", "step3_jax.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    timer = threading.Timer(WAIT_S, proc.kill)  # bounds the reads below
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if marker in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                break
        out, rest = proc.communicate(timeout=WAIT_S)
    finally:
        timer.cancel()
    return proc.returncode, out, lines + rest.splitlines()


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_ctrl_c_during_generate_is_one_line_and_exit_130(delay):
    """The marker is logged just before the weights load: the signal lands in loading or
    compiling (issue 17 saw exit 139, a segfault in teardown, 3 times in 3)."""
    marker = "no --checkpoint: config 'tiny'"
    code, out, err = _signal_at_marker(
        ["generate", "--config", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "400"],
        marker, delay)
    assert code == 130, err
    assert out == ""
    assert err == [f"step3-jax: {marker} with seeded random weights (seed 0)", INTERRUPTED_LINE]


SAVE_DELAYS = (0.0, 0.002, 0.005, 0.01, 0.02)  # s after orbax's save of the third chunk starts

CONVERT_WITH_A_SIGNAL = """
    import os, signal, sys, threading
    from step3_jax.checkpoint import store, streaming
    from step3_jax.cli import app

    where, argv = sys.argv[1], sys.argv[2:]
    if where == "commit":  # the store is complete and in place
        commit = store.Writer._commit
        def signalled(self):
            out = commit(self)
            os.kill(os.getpid(), signal.SIGINT)
            return out
        store.Writer._commit = signalled
        sys.argv[1:] = argv
        sys.exit(app.main())  # an owned process: the real exit
    # "save": while orbax saves the third chunk (its threads writing), once per delay, in-process
    save, calls = streaming.save_lazy, []
    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) % 6 == 3:  # 6 chunks per conversion (tiny: embed, 4 layers, head)
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
        return save(*args, **kwargs)
    streaming.save_lazy = signalled
    base = argv.pop()
    for i, delay in enumerate(map(float, where.split(","))):
        assert app.main([*argv, "--out", f"{base}-{i}"]) == 130
"""


def test_ctrl_c_inside_a_chunk_save_leaves_nothing_and_no_thread_traceback(tmp_path, hub_dir):
    """Interrupted inside orbax's save, the chunk is finished first, then the run stops
    (before, its threads printed tracebacks and could recreate the removed directory)."""
    proc = _python(CONVERT_WITH_A_SIGNAL, ",".join(map(str, SAVE_DELAYS)), "convert", "--hf",
                   str(hub_dir), "-q", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [INTERRUPTED_LINE] * len(SAVE_DELAYS)
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_ctrl_c_just_after_the_commit_leaves_a_complete_store(tmp_path, hub_dir, tiny_cfg):
    out = tmp_path / "out"
    proc = _python(CONVERT_WITH_A_SIGNAL, "commit", "convert", "--hf", str(hub_dir), "--dtype",
                   "float32", "-q", "--out", str(out))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == [INTERRUPTED_LINE]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and store.is_store(out)
    params, cfg = load(out, progress=False)
    want = load_hub(hub_dir, tiny_cfg, progress=False)
    assert cfg == tiny_cfg
    np.testing.assert_array_equal(np.asarray(params.lm_head), np.asarray(want.lm_head))
    np.testing.assert_array_equal(np.asarray(params.layers[1].ffn.router),
                                  np.asarray(want.layers[1].ffn.router))
