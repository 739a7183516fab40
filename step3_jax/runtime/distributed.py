"""AFD across JAX processes: the attention group and the FFN group in separate processes.

Real AFD puts attention and FFN instances on different machines. Here each is a JAX process of
one multi-controller run (``jax.distributed``): process 0 owns the attention group (its local
devices: embedding, norms, MFA, routers, KV cache, LM head) and the next process(es) own the FFN
group (expert, shared-expert and dense-FFN weights, split ``ep`` x ``tp`` over their devices).
Each process loads only the weights its devices hold.

The data path is the single-process one (:mod:`step3_jax.afd`), with the cross-mesh
``jax.device_put`` replaced by a device-to-device transfer between processes
(``jax.experimental.transfer``, JAX's own transfer server): per layer and micro-batch the
attention process offers the FP8 activations, per-token scales and routing, the FFN process
pulls them, runs the experts on its mesh and offers the result back. Pulls return at once and
resolve when the data arrives, so both processes keep dispatching asynchronously and the FFN of
micro-batch ``j`` overlaps the attention of ``j + 1``, as in one process.

Control (transfer-server addresses, a handshake that both sides run the same model and plan,
and one small header per pass with the micro-batch shapes, or stop) goes through the
coordination service's key-value store, reached by :func:`_kv_store`, the one place that uses
a private JAX API.

Failure handling: a dead peer closes its sockets and every pending transfer fails at once (the
process then exits non-zero); a peer that vanishes without closing them is caught by
``jax.distributed``'s heartbeat; a live peer that stops sending is caught by the watchdog
(:class:`Transport`): no transfer completing for ``--peer-timeout`` seconds while some are
pending ends the process with a one-line error. Every key-value wait has the same timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from step3_jax.errors import Step3Error
from step3_jax.runtime.launch import ProcessGroup

log = logging.getLogger("step3_jax")

ENV_TRANSFER_HOST = "STEP3_JAX_TRANSFER_HOST"  # the address peers reach this process's server at
_PREFIX = "step3_jax/afd"
_STRIDE = 4096  # micro-batches per pass, and attention devices, transfer ids allow


def initialize(group: ProcessGroup, timeout: float) -> None:
    """``jax.distributed.initialize`` for ``group`` (before any JAX computation). On CPU the
    cross-process collectives (the FFN mesh may span processes) go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=group.coordinator, num_processes=group.num_processes,
                  process_id=group.process_id, initialization_timeout=int(max(1, timeout)))
    try:
        try:  # a vanished peer fails the others within the heartbeat, not JAX's 100 s default
            jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=30,
                                       shutdown_timeout_seconds=60)
        except TypeError:  # a JAX without these knobs
            jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # jaxlib raises XlaRuntimeError (a RuntimeError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Step3Error(f"process {group.process_id}: cannot join the run at "
                         f"{group.coordinator} ({first})") from None
    log.info("process %d of %d (%s group): local devices %s", group.process_id,
             group.num_processes, group.role, [d.id for d in jax.local_devices()])


def _kv_store():
    """The coordination service's key-value store (``key_value_set``,
    ``blocking_key_value_get``). JAX has no public API for it: this is
    ``jax._src.distributed.global_state.client`` (present from jax 0.4 to at least 0.10.2), the
    one private API used here."""
    try:
        from jax._src.distributed import global_state

        client = global_state.client
    except (ImportError, AttributeError):
        client = ()
    if client is None:
        raise Step3Error("jax.distributed is not initialized (give --coordinator)")
    if not all(hasattr(client, m) for m in ("key_value_set", "blocking_key_value_get")):
        raise Step3Error(f"this JAX ({jax.__version__}) has no coordination key-value store at "
                         "jax._src.distributed.global_state.client, which multi-process AFD "
                         "uses to exchange addresses and requests (tested with jax 0.10.2)")
    return client


class _Kv:
    """JSON values in the key-value store, every wait bounded by ``timeout``."""

    def __init__(self, timeout: float, whoami: int):
        self.client, self.timeout, self.whoami = _kv_store(), timeout, whoami

    def put(self, key: str, value) -> None:
        self.client.key_value_set(f"{_PREFIX}/{key}", json.dumps(value))

    def get(self, key: str, waiting_for: str, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        try:
            raw = self.client.blocking_key_value_get(f"{_PREFIX}/{key}",
                                                     int(1000 * max(timeout, 0.001)))
        except Exception as e:  # XlaRuntimeError: DEADLINE_EXCEEDED, or the service is gone
            text = str(e)
            if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
                raise Step3Error(f"process {self.whoami}: no {waiting_for} in {timeout:g} s "
                                 "(--peer-timeout)") from None
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise Step3Error(f"process {self.whoami}: lost the run while waiting for "
                             f"{waiting_for} ({first})") from None
        return json.loads(raw)


# ----- devices and weights -------------------------------------------------------------------------

def group_devices(plan, group: ProcessGroup) -> list:
    """The devices for ``afd.group_meshes``: the attention group's ``A`` from process 0's local
    devices, then the FFN group's ``F`` from processes 1, 2, ... in order. Every FFN process
    must hold at least one FFN device (each process has a role)."""
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    attention = by_process.get(0, [])
    if plan.attention > len(attention):
        raise Step3Error(f"--afd {plan.attention}:{plan.ffn}: the attention group is process "
                         f"0's devices, and it has {len(attention)}")
    ffn_all = [d for p in range(1, group.num_processes) for d in by_process.get(p, [])]
    if plan.ffn > len(ffn_all):
        raise Step3Error(f"--afd {plan.attention}:{plan.ffn}: the FFN group is the devices of "
                         f"processes 1..{group.num_processes - 1}, and they have {len(ffn_all)}")
    ffn = ffn_all[: plan.ffn]
    idle = sorted(set(range(1, group.num_processes)) - {d.process_index for d in ffn})
    if idle:
        raise Step3Error(f"--afd {plan.attention}:{plan.ffn}: process {idle[0]} would hold no "
                         f"FFN device ({plan.ffn} FFN devices fill processes "
                         f"1..{ffn[-1].process_index}); use fewer processes or a larger F")
    return attention[: plan.attention] + ffn


def ffn_part(cfg):
    """A params-shaped tree of bools: True for the weights the FFN group holds (routed experts,
    shared expert, dense FFN), False for the attention group's (embedding, norms, MFA, router,
    LM head)."""
    from step3_jax.model.weights import Moe, declare, is_spec

    decl = declare(cfg)
    to = lambda value: (lambda tree: jax.tree.map(lambda _: value, tree, is_leaf=is_spec))  # noqa
    layers = []
    for layer in decl.layers:
        ffn = to(True)(layer.ffn)
        if isinstance(layer.ffn, Moe):
            ffn = ffn.replace(router=False)
        layers.append(to(False)(layer).replace(ffn=ffn))
    return to(False)(decl).replace(layers=tuple(layers))


def part(cfg, role: str):
    """The ``keep`` tree of ``role`` (``checkpoint.load(keep=...)``)."""
    ffn = ffn_part(cfg)
    return ffn if role == "ffn" else jax.tree.map(lambda x: not x, ffn)


def load_part(args, plan, devices, role: str):
    """This process's weights only (``--checkpoint``: Hub tensors or orbax arrays of the part
    alone; random weights: the part's leaves, identical to a whole-model init), each straight
    onto its AFD sharding; placed as :func:`afd.place` places them."""
    from step3_jax.runtime import afd
    from step3_jax.checkpoint.hub import load
    from step3_jax.model.config import load_config
    from step3_jax.checkpoint.hub import checkpoint_dir

    source = args.config if args.config is not None else checkpoint_dir(args.checkpoint)
    cfg = load_config(source, dtype=args.dtype, moe_impl=args.moe_impl)
    shardings = afd.afd_shardings(cfg, plan, devices)
    params, cfg = load(args.checkpoint, args.config, dtype=args.dtype, seed=args.seed,
                       moe_impl=args.moe_impl, progress=not args.quiet, shardings=shardings,
                       expert_parallel=plan.ffn_ep, keep=part(cfg, role))
    return place_part(params, cfg, plan, devices, role), cfg, params


def place_part(params, cfg, plan, devices, role: str, remote=None):
    """:func:`afd.place` for one side: an :class:`afd.AfdModel` with only this role's weights
    (``attn`` or ``ffn``; the other empty)."""
    from step3_jax.runtime import afd

    attn_mesh, ffn_mesh = afd.group_meshes(plan, devices)
    if role == "attention":
        attn, local = afd.place_attention(params, attn_mesh)
        return afd.AfdModel(cfg, plan, attn_mesh, ffn_mesh, attn, (), local=local, remote=remote)
    return afd.AfdModel(cfg, plan, attn_mesh, ffn_mesh, None,
                        afd.place_ffn(params, cfg, plan, devices), remote=remote)


def part_bytes(params) -> int:
    """Bytes of the weights a process loaded (global sizes, each weight once)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


# ----- the transport ---------------------------------------------------------------------------

def _reachable_host(coordinator: str) -> str:
    """The local address peers can reach this process at: ``$STEP3_JAX_TRANSFER_HOST``, else the
    interface the route to the coordinator leaves by (loopback for a loopback coordinator)."""
    if os.environ.get(ENV_TRANSFER_HOST):
        return os.environ[ENV_TRANSFER_HOST]
    host = coordinator.rpartition(":")[0].strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: no packet is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1" if host in ("localhost", "127.0.0.1") else socket.gethostname()


def _abort(message: str) -> None:
    print(f"step3-jax: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # a thread cannot interrupt the main thread blocked inside the runtime


class Transport:
    """Device-to-device transfers with the other processes over ``jax.experimental.transfer``.

    ``send(uuid, arrays)`` offers arrays (non-blocking; each offer serves one pull);
    ``recv(peer, uuid, abstract)`` pulls ``ShapeDtypeStruct``s (the shapes must be known
    beforehand) and returns arrays at once that resolve when the data has arrived. Offer and
    pull may come in either order. Both sides must use the same shard layout: here always one
    device (each attention device sends its own rows and receives its own rows back).

    Watchdog: while pulls are pending, if none completes for ``timeout`` seconds, ``on_timeout``
    is called with a description (default: print a one-line error and end the process).
    """

    def __init__(self, kv: _Kv, group: ProcessGroup, timeout: float,
                 on_timeout: Callable[[str], None] = _abort):
        from jax.experimental import transfer

        host = _reachable_host(group.coordinator)
        client = jax.local_devices()[0].client
        bracket = f"[{host}]" if ":" in host else host
        self.server = transfer.start_transfer_server(client, f"{bracket}:0", [f"{bracket}:0"])
        self.address = self.server.address()
        self.kv, self.group, self.timeout, self.on_timeout = kv, group, timeout, on_timeout
        self.kv.put(f"transfer/{group.process_id}", self.address)
        self._conns: dict[int, object] = {}
        self._pending: list[tuple[list, str]] = []
        self._progress = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def connect(self, peer: int):
        if peer not in self._conns:
            address = self.kv.get(f"transfer/{peer}", f"transfer address of process {peer}")
            self._conns[peer] = self.server.connect(address)
        return self._conns[peer]

    def send(self, uuid: int, arrays: Sequence[jax.Array]) -> None:
        self.server.await_pull(uuid, list(arrays))

    def recv(self, peer: int, uuid: int, abstract: Sequence[jax.ShapeDtypeStruct],
             what: str = "") -> list:
        out = self.connect(peer).pull(uuid, list(abstract))
        with self._lock:
            if not self._pending:
                self._progress = time.monotonic()
            self._pending.append((out, what or f"transfer {uuid}"))
        return out

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(min(0.2, self.timeout / 4))
            with self._lock:
                before = len(self._pending)
                self._pending = [(a, w) for a, w in self._pending
                                 if not all(x.is_ready() for x in a)]
                now = time.monotonic()
                if len(self._pending) < before or not self._pending:
                    self._progress = now
                stuck = (self._pending[0][1] if self._pending and
                         now - self._progress > self.timeout else None)
            if stuck is not None:
                self._closed = True
                self.on_timeout(f"process {self.group.process_id}: no transfer completed in "
                                f"{self.timeout:g} s while waiting for {stuck} (--peer-timeout)")

    def close(self) -> None:
        self._closed = True


# ----- the two sides -------------------------------------------------------------------------------

def payload_abstract(cfg, plan, layer: int, rows: int, length: int, device) -> list:
    """What the attention group sends for ``layer`` and a micro-batch ``[rows, length]``, in
    ``jax.tree.leaves((q, scale, routing))`` order (``afd._attention_step``'s third output)."""
    on = SingleDeviceSharding(device)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=on)  # noqa
    H, k = cfg.hidden_size, cfg.moe_top_k
    out = [sds((rows, length, H), plan.transfer_dtype)]
    if plan.transfer_dtype == "float8_e4m3fn":
        out.append(sds((rows, length, 1), "float32"))
    if cfg.is_moe(layer):
        out += [sds((rows, length, k), "float32"), sds((rows, length, k), "int32")]
    return out


def _result_abstract(cfg, rows: int, length: int, device) -> list:
    return [jax.ShapeDtypeStruct((rows, length, cfg.hidden_size), np.dtype(cfg.dtype),
                                 sharding=SingleDeviceSharding(device))]


def _uuid(pass_no: int, layer: int, mb: int, shard: int, kind: int, receiver: int, cfg,
          group: ProcessGroup) -> int:
    """A transfer id unique over the run: pass, layer, micro-batch, attention shard, direction
    (0: A->F, 1: F->A), receiving process."""
    n = (pass_no * cfg.num_hidden_layers + layer) * _STRIDE + mb
    return ((n * _STRIDE + shard) * 2 + kind) * group.num_processes + receiver


def _handshake_value(cfg, plan) -> dict:
    return {"config": repr(cfg), "plan": dataclasses.asdict(plan)}


class RemoteFfn:
    """The attention process's view of the FFN group (``AfdModel.remote``, used by
    ``afd._stack_pass``): per pass a header with every micro-batch's shard shapes, then per
    layer and micro-batch :meth:`exchange`: each attention device's payload goes straight from
    that device, and its rows of the FFN output come straight back to it."""

    def __init__(self, transport: Transport, kv: _Kv, cfg, plan, group: ProcessGroup,
                 ffn_processes: Sequence[int]):
        self.transport, self.kv, self.cfg, self.plan, self.group = transport, kv, cfg, plan, group
        self.ffn_processes = list(ffn_processes)
        self.leader = self.ffn_processes[0]  # sends the results back
        self.pass_no = 0
        self.shapes: list = []
        self.stopped = False

    def begin_pass(self, shapes: Sequence[Sequence[tuple]]) -> None:
        """``shapes[j][s]``: the ``[rows, length]`` tokens of micro-batch ``j``'s shard ``s``."""
        if len(shapes) > _STRIDE or any(len(mb) > _STRIDE for mb in shapes):
            raise Step3Error(f"at most {_STRIDE} micro-batches and attention devices")
        self.pass_no += 1
        self.shapes = [[[int(n) for n in s[:2]] for s in mb] for mb in shapes]
        self.kv.put(f"pass/{self.pass_no}", {"shapes": self.shapes})

    def exchange(self, layer: int, mb: int, pieces: Sequence, shards: Sequence) -> list:
        """Send ``pieces[s]`` (``(q, scale, routing)`` on ``shards[s].device``) to the FFN
        process(es); returns the FFN output of each shard, on its device (arrays that resolve
        when the data arrives)."""
        outs = []
        for s, (piece, shard) in enumerate(zip(pieces, shards)):
            flat = jax.tree.leaves(piece)
            rows, length = self.shapes[mb][s]
            want = payload_abstract(self.cfg, self.plan, layer, rows, length, shard.device)
            got = [(x.shape, x.dtype) for x in flat]
            if got != [(w.shape, w.dtype) for w in want]:
                raise Step3Error(f"layer {layer}: the A->F payload {got} differs from what the "
                                 f"FFN process expects {[(w.shape, w.dtype) for w in want]}")
            for r in self.ffn_processes:
                self.transport.send(_uuid(self.pass_no, layer, mb, s, 0, r, self.cfg, self.group),
                                    flat)
        for s, shard in enumerate(shards):
            rows, length = self.shapes[mb][s]
            (out,) = self.transport.recv(
                self.leader, _uuid(self.pass_no, layer, mb, s, 1, 0, self.cfg, self.group),
                _result_abstract(self.cfg, rows, length, shard.device),
                f"the FFN output of layer {layer}, micro-batch {mb} (process {self.leader})")
            outs.append(out)
        return outs

    def stop(self, error: str | None = None) -> None:
        if not self.stopped:
            self.stopped = True
            self.kv.put(f"pass/{self.pass_no + 1}", {"stop": True, "error": error})


def _replicate(x: jax.Array, mesh) -> jax.Array:
    """A single-device array replicated over ``mesh`` (which may span processes: every process
    passes its own copy for its local devices)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays(
        x.shape, NamedSharding(mesh, P()), [jax.device_put(x, d) for d in local])


def serve_ffn(m, transport: Transport, kv: _Kv, group: ProcessGroup) -> int:
    """The FFN process's loop: wait for a pass header (or stop), then per layer and micro-batch
    pull every attention shard's inputs, run ``afd._ffn_step`` on the FFN mesh and offer each
    shard's rows of the output back. All work of a pass is dispatched without waiting, so it
    runs as the inputs arrive. Returns the passes served."""
    from step3_jax.runtime import afd

    cfg, plan, mesh = m.cfg, m.plan, m.ffn_mesh
    me = group.process_id
    mine = [d for d in mesh.devices.flat if d.process_index == me]
    leader = min(d.process_index for d in mesh.devices.flat) == me
    fp8 = plan.transfer_dtype == "float8_e4m3fn"
    pass_no = 0
    while True:
        # Headers stay in the store (~100 B each): with several FFN processes none knows when
        # the others have read one.
        header = kv.get(f"pass/{pass_no + 1}", "a request from the attention process (0)")
        if header.get("stop"):
            if header.get("error"):
                log.info("process 0 stopped with an error: %s", header["error"])
            return pass_no
        pass_no += 1
        for i in range(cfg.num_hidden_layers):
            for j, shapes in enumerate(header["shapes"]):
                pieces = []
                for s, (rows, length) in enumerate(shapes):
                    flat = transport.recv(
                        0, _uuid(pass_no, i, j, s, 0, me, cfg, group),
                        payload_abstract(cfg, plan, i, rows, length, mine[s % len(mine)]),
                        f"the attention output of layer {i}, micro-batch {j}")
                    flat = [_replicate(x, mesh) for x in flat]
                    pieces.append((flat[0], flat[1] if fp8 else None,
                                   tuple(flat[-2:]) if cfg.is_moe(i) else None))
                with jax.set_mesh(mesh):
                    outs = afd._ffn_step(m.ffn[i], tuple(pieces), cfg=cfg)
                if not leader:
                    continue
                for s, out in enumerate(outs):
                    src = mine[s % len(mine)]  # spread the sends over the local devices
                    piece = next(p.data for p in out.addressable_shards if p.device == src)
                    if piece.dtype != np.dtype(cfg.dtype):
                        piece = piece.astype(cfg.dtype)
                    transport.send(_uuid(pass_no, i, j, s, 1, 0, cfg, group), [piece])


# ----- a run -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Session:
    """One process's part of a multi-process AFD run, after start-up and the handshake."""

    group: ProcessGroup
    plan: object
    cfg: object
    model: object        # afd.AfdModel with this role's weights
    transport: Transport
    kv: _Kv
    layout: dict         # which process holds which devices and how many weight bytes

    @property
    def role(self) -> str:
        return self.group.role

    def serve(self) -> int:
        passes = serve_ffn(self.model, self.transport, self.kv, self.group)
        log.info("FFN process %d: served %d passes; stopping", self.group.process_id, passes)
        self.transport.close()
        return passes

    def close(self, error: str | None = None) -> None:
        if self.model.remote is not None:
            self.model.remote.stop(error)
        self.transport.close()

    def run(self, fn, *args, **kwargs):
        """Process 0: ``fn(*args, **kwargs)`` (generating through the remote FFN), then stop the
        FFN processes; on failure stop them too, a failed transfer as a one-line error."""
        try:
            out = fn(*args, **kwargs)
        except BaseException as e:
            self.close(error=f"{type(e).__name__}: {e}")
            if isinstance(e, RuntimeError):  # jaxlib's XlaRuntimeError: a transfer failed
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                peers = ", ".join(map(str, self.model.remote.ffn_processes))
                raise Step3Error(f"process 0: a transfer with FFN process {peers} failed "
                                 f"({first})") from None
            raise
        self.close()
        return out


def start(args, plan, group: ProcessGroup) -> Session:
    """Join the run, load this process's weights, connect, and check that every process runs
    the same model and plan. Process 0 gets an ``AfdModel`` whose FFN is remote
    (:class:`RemoteFfn`); the others one to :meth:`Session.serve` with."""
    timeout = args.peer_timeout
    initialize(group, timeout)
    devices = group_devices(plan, group)
    me = group.process_id
    ffn_processes = sorted({d.process_index for d in devices[plan.attention:]})
    model, cfg, params = load_part(args, plan, devices, group.role)
    loaded = part_bytes(params)
    del params
    kv = _Kv(timeout, me)
    transport = Transport(kv, group, timeout)
    hello = _handshake_value(cfg, plan)
    if group.role == "attention":
        kv.put("hello", hello)
        layout = {"num_processes": group.num_processes,
                  "attention": {"process": 0, "devices": [d.id for d in devices[:plan.attention]],
                                "weight_bytes": loaded},
                  "ffn": {"processes": ffn_processes,
                          "devices": [d.id for d in devices[plan.attention:]],
                          "weight_bytes": 0}}
        for p in ffn_processes:
            reply = kv.get(f"ready/{p}", f"start-up of FFN process {p}")
            if "error" in reply:
                raise Step3Error(f"process {p}: {reply['error']}")
            layout["ffn"]["weight_bytes"] = reply["weight_bytes"]  # global sizes: same on each
            transport.connect(p)
        model.remote = RemoteFfn(transport, kv, cfg, plan, group, ffn_processes)
    else:
        theirs = kv.get("hello", "start-up of the attention process (0)")
        if theirs != hello:
            what = "config" if theirs["config"] != hello["config"] else "AFD plan"
            message = (f"its {what} differs from process 0's (give every process the same "
                       "model flags and --afd/--ffn-mesh/--micro-batches/--afd-transfer-dtype)")
            kv.put(f"ready/{me}", {"error": message})
            raise Step3Error(f"process {me}: {message}")
        transport.connect(0)
        kv.put(f"ready/{me}", {"weight_bytes": loaded})
        layout = {}
    log.info("process %d: %s weights loaded (%.1f MB), transfer server at %s", me, group.role,
             loaded / 1e6, transport.address)
    return Session(group, plan, cfg, model, transport, kv, layout)


def generate(args, plan, group: ProcessGroup, prompts, **knobs):
    """``step3-jax generate`` in one process of a multi-process AFD run: process 0 generates
    (``afd.generate`` with the FFN remote) and returns ``(results, metrics, cfg)``, metrics with
    the process layout; an FFN process serves until process 0 stops it and returns None."""
    from step3_jax.runtime import afd

    session = start(args, plan, group)
    if session.role == "ffn":
        session.serve()
        return None
    # No profiler trace: the FFN devices are in another process, a trace here would miss them.
    results, metrics = session.run(afd.generate, session.model, prompts, profile=False, **knobs)
    metrics["processes"] = session.layout
    return results, metrics, session.cfg
