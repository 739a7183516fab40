"""AFD across JAX processes: attention in one process, FFN in another (``step3-jax launch``).

Each multi-process run is a child ``step3-jax launch`` (its processes get their own JAX), so
the test process's 8 emulated devices are untouched. In-process tests cover the weight split,
partial loading and the transport on a self-connected transfer server.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from step3_jax.checkpoint import hub, loader, store
from step3_jax.errors import Step3Error
from step3_jax.model.weights import Moe
from step3_jax.runtime import afd, distributed, launch, transport

from conftest import run_cli

PROMPTS = [[3, 17, 42], [5, 6, 7, 8, 9, 10, 11], [200, 1, 99, 2, 3]]
NEW_TOKENS = 4


def _launch(*argv, timeout=300):
    """``step3-jax launch ARGV`` in a child process: ``(exit code, stdout, stderr)``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "step3_jax.cli", "launch", *argv],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _generate_args(checkpoint_dir, transfer, micro_batches):
    ids = [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    return ["generate", "--checkpoint", str(checkpoint_dir), "--afd", "2:2", *ids,
            "--max-new-tokens", str(NEW_TOKENS), "--eos-id", "-1", "--afd-transfer-dtype",
            transfer, "--micro-batches", str(micro_batches), "--json", "--peer-timeout", "120"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_params, tiny_cfg):
    return store.save(tiny_params, tiny_cfg, tmp_path_factory.mktemp("store") / "tiny",
                      weights="float32", progress=False)


_REFERENCE: dict = {}


def _single_process(params, cfg, transfer, micro_batches):
    """Single-process 2:2 AFD's tokens (computed once per setting)."""
    key = (transfer, micro_batches)
    if key not in _REFERENCE:
        m = afd.place(params, cfg, afd.parse_plan("2:2", None, micro_batches, transfer))
        results, _ = afd.generate(m, PROMPTS, max_new_tokens=NEW_TOKENS, eos_ids=[-1],
                                  profile=False)
        _REFERENCE[key] = [r.generated_ids for r in results]
    return _REFERENCE[key]


@pytest.mark.parametrize("source, transfer, micro_batches", [
    ("hub", "float32", 3),          # float32 transfer: exactly single-process AFD
    ("orbax", "float8_e4m3fn", 2),  # the paper's FP8 transfer: exactly single-process FP8 AFD
])
def test_two_processes_equal_single_process_afd(hub_dir, store_dir, tiny_params, tiny_cfg,
                                                source, transfer, micro_batches):
    """2 processes x 2 devices, the attention group in process 0 and the FFN group in process 1,
    give the tokens single-process AFD gives. The same float32 programs run on the same kind of
    devices and the transfers copy bytes, so equality is exact (no tolerance)."""
    directory = hub_dir if source == "hub" else store_dir
    code, out, err = _launch("--processes", "2", "--devices-per-process", "2", "--",
                             *_generate_args(directory, transfer, micro_batches))
    assert code == 0, err[-3000:]
    doc = json.loads(out)  # exactly one JSON document on stdout: rank 0's
    got = [r["generated_ids"] for r in doc["results"]]
    assert got == _single_process(tiny_params, tiny_cfg, transfer, micro_batches)
    assert all(len(g) == NEW_TOKENS for g in got)
    # Same keys as single-process AFD, plus the process layout.
    assert {"results", "metrics", "placement", "afd", "processes"} <= set(doc)
    assert doc["afd"]["transfer_dtype"] == transfer
    assert doc["afd"]["micro_batches"] == micro_batches
    procs = doc["processes"]
    assert procs["num_processes"] == 2 and procs["ffn"]["processes"] == [1]
    attn_ids, ffn_ids = procs["attention"]["devices"], procs["ffn"]["devices"]
    assert len(attn_ids) == 2 and len(ffn_ids) == 2 and not set(attn_ids) & set(ffn_ids)
    assert doc["placement"] == {"attention_devices": attn_ids, "ffn_devices": ffn_ids}
    # Each process loaded exactly its part: the two add up to the model, each once.
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tiny_params))
    attn_bytes, ffn_bytes = procs["attention"]["weight_bytes"], procs["ffn"]["weight_bytes"]
    assert attn_bytes > 0 and ffn_bytes > 0 and attn_bytes + ffn_bytes == total
    # Logs: both ranks streamed with their prefix; the FFN process served every pass.
    assert "[rank 0]" in err and "[rank 1]" in err
    assert f"served {NEW_TOKENS} passes" in err  # prefill + NEW_TOKENS - 1 decode steps


def test_ffn_group_spanning_two_processes(hub_dir, tiny_params, tiny_cfg):
    """1 attention process + an FFN group over 2 processes of 1 device each (its expert-parallel
    psum crosses processes through gloo): the same tokens as single-process AFD. With float32
    transfer AFD's tokens do not depend on the split (tests/test_afd.py: they equal colocated),
    so the reference is the 2:2 single-process run, exactly."""
    args = _generate_args(hub_dir, "float32", 3)
    args[args.index("--afd") + 1] = "1:2"
    code, out, err = _launch("--processes", "3", "--", *args)
    assert code == 0, err[-3000:]
    doc = json.loads(out)
    assert [r["generated_ids"] for r in doc["results"]] == \
        _single_process(tiny_params, tiny_cfg, "float32", 3)
    assert doc["processes"]["ffn"]["processes"] == [1, 2]
    assert "served" in err and "[rank 2]" in err


def _wait_for(event, proc, timeout=180.0) -> bool:
    """Wait for ``event`` while ``proc`` runs (False at once if it exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if event.wait(0.2):
            return True
    return event.is_set()


def _long_launch(hub_dir, **popen_kw):
    """A 2-process AFD launch generating far longer than a test waits, its stderr followed on a
    thread: ``(proc, lines, reader, loaded)``, ``loaded`` set once the FFN process (rank 1) has
    its weights."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = _generate_args(hub_dir, "float32", 3)
    args[args.index("--max-new-tokens") + 1] = "500"
    proc = subprocess.Popen([sys.executable, "-m", "step3_jax.cli", "launch", "--processes",
                             "2", "--devices-per-process", "2", "--", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **popen_kw)
    lines: list[str] = []
    loaded = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "[rank 1] step3-jax: process 1: ffn weights loaded" in line:
                loaded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader, loaded


def test_killed_process_fails_the_launch_in_bounded_time(hub_dir):
    """SIGKILL the FFN process mid-run: the launch stops the attention process and exits
    non-zero naming rank 1 within 60 s (measured: a few seconds; the bound is generous for a
    loaded CI machine), instead of hanging on transfers that will never arrive."""
    proc, lines, reader, loaded = _long_launch(hub_dir)
    try:
        assert _wait_for(loaded, proc), "".join(lines)[-3000:]
        pids = dict(re.findall(r"rank (\d) pid (\d+)", "".join(lines)))
        os.kill(int(pids["1"]), signal.SIGKILL)  # our own grandchild, by its pid
        killed = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = proc.stdout.read()
    proc.stdout.close(), proc.stderr.close()
    err = "".join(lines)
    assert code != 0
    assert elapsed < 60
    # "; stopped rank 0" follows unless rank 0 had already failed on its own lost transfers.
    assert "step3-jax: error: rank 1 was killed by SIGKILL" in err, err[-2000:]
    assert out == ""  # no partial results
    with pytest.raises(ProcessLookupError):  # the attention process is gone too
        os.kill(int(pids["0"]), 0)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_every_process(hub_dir, sig, code, word):
    """Ctrl-C (SIGINT) or SIGTERM to the launcher mid-run: every process is stopped (each gets
    the signal, then SIGKILL after 3 s) and the launcher exits 130 / 143."""
    proc, lines, reader, loaded = _long_launch(
        hub_dir, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _wait_for(loaded, proc), "".join(lines)[-3000:]
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdout.close(), proc.stderr.close()
    time.sleep(0.5)
    err = "".join(lines)
    assert f"step3-jax: {word}; stopped every process" in err, err[-2000:]
    for pid in re.findall(r"rank \d pid (\d+)", err):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_too_few_devices_is_a_one_line_error_from_every_rank(hub_dir):
    ids = ["--prompt-ids", "1,2"]
    code, out, err = _launch("--processes", "2", "--", "generate", "--checkpoint", str(hub_dir),
                             "--afd", "2:1", *ids, "--peer-timeout", "60")
    assert code == 2 and out == ""
    # Every rank finds the same error; the first to exit is reported, the other stopped (it may
    # not have printed yet).
    message = "step3-jax: error: --afd 2:1: the attention group is process 0's devices, and it has 1"
    assert re.search(rf"\[rank [01]\] {re.escape(message)}", err), err[-2000:]
    assert re.search(r"step3-jax: error: rank [01] exited with code 2", err)
    assert "Traceback" not in err


def test_processes_with_different_plans_refuse_to_run(hub_dir):
    """Started by hand (as on a cluster) with different --micro-batches: the FFN process finds
    the mismatch in the handshake, and both exit 2 with one line naming it."""
    from step3_jax.runtime.launch import child_env, free_port

    port = free_port()
    procs = []
    for rank, mbs in ((0, "3"), (1, "2")):
        argv = [sys.executable, "-m", "step3_jax.cli", "generate", "--checkpoint", str(hub_dir),
                "--afd", "1:1", "--prompt-ids", "1,2", "--micro-batches", mbs,
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                str(rank), "--peer-timeout", "60"]
        procs.append(subprocess.Popen(argv, env=child_env(1), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    message = ("its AFD plan differs from process 0's (give every process the same model flags "
               "and --afd/--ffn-mesh/--micro-batches/--afd-transfer-dtype)")
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 2 and out == "", err[-2000:]
        assert err.strip().splitlines()[-1] == f"step3-jax: error: process 1: {message}"


# ----- flags, in process (nothing here may reach jax.distributed.initialize) ---------------------

GEN = ["generate", "--config", "tiny", "--prompt-ids", "1,2", "--peer-timeout", "5"]


@pytest.mark.parametrize("argv, message", [
    (GEN + ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"],
     "--coordinator/--num-processes/--process-id need --afd A:F"),
    (GEN + ["--afd", "1:1", "--coordinator", "nohost", "--num-processes", "2",
            "--process-id", "0"], "--coordinator must be HOST:PORT, got 'nohost'"),
    (GEN + ["--afd", "1:1", "--coordinator", "h:1", "--num-processes", "1", "--process-id", "0"],
     "--num-processes must be >= 2"),
    (GEN + ["--afd", "1:1", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0..1, got 2"),
    (GEN + ["--afd", "1:1", "--coordinator", "h:1", "--process-id", "0"],
     "--coordinator needs --num-processes (or $JAX_NUM_PROCESSES)"),
    (GEN + ["--afd", "1:1", "--num-processes", "2"],
     "--num-processes/--process-id need --coordinator HOST:PORT"),
    (GEN + ["--afd", "1:1", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1",
            "--peer-timeout", "0"], "--peer-timeout must be > 0"),
    (["launch", "--processes", "1", "--", "generate", "--afd", "1:1"],
     "--processes must be >= 2"),
    (["launch", "--processes", "2", "--devices-per-process", "0", "--", "generate"],
     "--devices-per-process must be >= 1"),
    (["launch", "--processes", "2"], "no command: step3-jax launch --processes N -- generate"),
    (["launch", "--processes", "2", "--", "score", "--ids", "1,2"],
     "launch runs generate, bench, got 'score'"),
    (["launch", "--processes", "2", "--", "generate", "--prompt-ids", "1"],
     "the launched command needs --afd A:F"),
    (["launch", "--processes", "2", "--", "generate", "--afd", "1:1", "--process-id", "0"],
     "--process-id is set by launch for each process"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("step3-jax: error: ")
    assert message in err


def test_environment_variables_fill_in_the_flags():
    class Args:
        coordinator = num_processes = process_id = None
        peer_timeout = 5.0

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "3",
           "JAX_PROCESS_ID": "2"}
    group = launch.process_group(Args, afd=True, environ=env)
    assert (group.coordinator, group.num_processes, group.process_id, group.role) == \
        ("10.0.0.1:1234", 3, 2, "ffn")
    assert launch.process_group(Args, afd=False, environ=env) is None  # only with --afd
    Args.process_id = 0  # a flag wins over its variable
    assert launch.process_group(Args, afd=True, environ=env).role == "attention"
    with pytest.raises(Step3Error, match=r"\$JAX_NUM_PROCESSES must be an integer"):
        launch.process_group(Args, afd=True, environ={**env, "JAX_NUM_PROCESSES": "two"})


def test_child_environment():
    env = launch.child_env(3, {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                               "JAX_PROCESS_ID": "5", "PATH": "/bin"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu" and "JAX_PROCESS_ID" not in env
    assert env["PATH"] == "/bin"


# ----- the weight split and partial loading ----------------------------------------------------

def test_parts_split_the_model_with_the_router_on_attention(tiny_cfg):
    ffn, attn = distributed.part(tiny_cfg, "ffn"), distributed.part(tiny_cfg, "attention")
    for f, a in zip(jax.tree.leaves(ffn), jax.tree.leaves(attn)):
        assert f != a  # every weight in exactly one part
    moe = next(i for i, layer in enumerate(ffn.layers) if isinstance(layer.ffn, Moe))
    assert attn.layers[moe].ffn.router and not ffn.layers[moe].ffn.router
    assert all(jax.tree.leaves(ffn.layers[moe].ffn.replace(router=True)))
    assert attn.embed and attn.layers[0].attn.wq and not ffn.embed


@pytest.mark.parametrize("source", ["hub", "orbax"])
def test_each_process_reads_only_its_part(monkeypatch, hub_dir, store_dir, tiny_cfg, source):
    """Loading one part reads none of the other part's tensors (Hub: the files' tensors read;
    orbax: the arrays asked of orbax's partial restore), and its values equal the whole load's."""
    directory = {"hub": hub_dir, "orbax": store_dir}[source]
    config = None
    plan = afd.parse_plan("2:2", transfer_dtype="float32")
    shardings = afd.afd_shardings(tiny_cfg, plan)
    whole, _ = loader.load(directory, config, progress=False, shardings=shardings,
                               expert_parallel=plan.ffn_ep)
    whole = dict(jax.tree_util.tree_flatten_with_path(whole)[0])
    hub_read, orbax_read = [], []
    real_read, real_subset = hub.HubReader.read, store._restore_subset
    monkeypatch.setattr(hub.HubReader, "read",
                        lambda self, name: hub_read.append(name) or real_read(self, name))

    def subset(path, target, options):
        orbax_read.extend(jax.tree_util.keystr(k) for k, _ in
                          jax.tree_util.tree_flatten_with_path(store._prune(target))[0])
        return real_subset(path, target, options)

    monkeypatch.setattr(store, "_restore_subset", subset)
    seen = {}
    for role in ("attention", "ffn"):
        hub_read.clear(), orbax_read.clear()
        params, _ = loader.load(directory, config, progress=False, shardings=shardings,
                                    expert_parallel=plan.ffn_ep,
                                    keep=distributed.part(tiny_cfg, role))
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        for path, value in leaves:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(whole[path]))
        seen[role] = {path for path, _ in leaves}
        ffn_names = [n for n in hub_read + orbax_read
                     if re.search(r"moe\.(gate|up|down)_proj|share_expert|mlp\.|'(gate|up|down|"
                                  r"shared)'", n)]
        if role == "attention":
            assert not ffn_names, ffn_names
        else:
            assert len(ffn_names) == len(hub_read + orbax_read)  # nothing but FFN weights
        assert hub_read if source == "hub" else orbax_read
    assert not seen["attention"] & seen["ffn"]
    assert seen["attention"] | seen["ffn"] == set(whole)


def test_random_part_has_the_whole_models_values(tiny_cfg):
    """Random weights of a subset: leaf ``j`` drawn from ``fold_in(PRNGKey(seed), j)`` as in the
    whole-model init, the rest absent. Checked against that formula eagerly on three leaves (an
    expert stack, an attention weight, a norm): a jitted init of a whole part costs ~10 s here."""
    from step3_jax.model.weights import _init_leaf, declare, init_params, is_spec

    specs, treedef = jax.tree.flatten(declare(tiny_cfg), is_leaf=is_spec)
    ffn = jax.tree.leaves(distributed.part(tiny_cfg, "ffn"))
    chosen = {ffn.index(True), ffn.index(False) + 1, len(specs) - 2}
    flags = [j in chosen for j in range(len(specs))]
    keep = treedef.unflatten(flags)
    params = init_params(tiny_cfg, 3, keep=keep)
    got = iter(jax.tree.leaves(params))
    assert len(jax.tree.leaves(params)) == sum(flags) > 0
    key = jax.random.PRNGKey(3)
    for j, (spec, kept) in enumerate(zip(specs, flags)):
        if kept:
            want = _init_leaf(spec, jax.random.fold_in(key, j), tiny_cfg)
            # Same threefry bits and the same float32 ops, jitted or eager: equal to 1 ulp.
            np.testing.assert_allclose(np.asarray(next(got)), np.asarray(want), rtol=1e-6,
                                       atol=1e-7)


# ----- the transport, on one self-connected transfer server -------------------------------------

class _DictKv:
    def __init__(self):
        self.values = {}

    def put(self, key, value):
        self.values[key] = value

    def get(self, key, waiting_for, timeout=None):
        return self.values[key]


def test_transport_round_trip_and_watchdog():
    """Arrays offered under an id arrive bit-exact on another device (FP8, float32, int32; the
    pull may come first); a pull nobody offers trips the watchdog within its timeout."""
    import ml_dtypes

    tripped = threading.Event()
    messages = []
    group = launch.ProcessGroup("127.0.0.1:1", 2, 0)
    t = transport.Transport(_DictKv(), group, timeout=1.0,
                              on_timeout=lambda m: (messages.append(m), tripped.set()))
    try:
        devices = jax.devices()
        values = [np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(ml_dtypes.float8_e4m3fn),
                  np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3, 1),
                  np.arange(6, dtype=np.int32).reshape(2, 3, 1)]
        abstract = [jax.ShapeDtypeStruct(v.shape, v.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(devices[3]))
                    for v in values]
        got = t.recv(0, 7, abstract)  # before the offer
        t.send(7, [jax.device_put(v, devices[0]) for v in values])
        for g, v in zip(got, values):
            assert g.devices() == {devices[3]}
            np.testing.assert_array_equal(np.asarray(g), v)
        t.recv(0, 8, abstract[:1], "the never-sent array")
        assert tripped.wait(10)
        assert "no transfer completed in 1 s while waiting for the never-sent array" in messages[0]
        t.send(8, [jax.device_put(values[0], devices[0])])  # leave nothing pending
    finally:
        t.close()


def test_launch_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "launch", "--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: step3-jax launch" in out and "--devices-per-process" in out
