"""AFD across JAX processes: the attention group and the FFN group in separate processes.

Real AFD puts attention and FFN instances on different machines. Here each is a JAX process of
one multi-controller run (``jax.distributed``): process 0 owns the attention group (its local
devices: embedding, norms, MFA, routers, KV cache, LM head) and the next process(es) own the FFN
group (expert, shared-expert and dense-FFN weights, split ``ep`` x ``tp`` over their devices).
Each process loads only the weights its devices hold.

The data path is the single-process one (:mod:`step3_jax.runtime.afd`), with the cross-mesh
``jax.device_put`` replaced by a device-to-device transfer between processes
(``jax.experimental.transfer``, JAX's own transfer server): per layer and micro-batch the
attention process offers the FP8 activations, per-token scales and routing, the FFN process
pulls them, runs the experts on its mesh and offers the result back. Pulls return at once and
resolve when the data arrives, so both processes keep dispatching asynchronously and the FFN of
micro-batch ``j`` overlaps the attention of ``j + 1``, as in one process.

Control (transfer-server addresses, a handshake that both sides run the same model and plan,
and one small header per pass with the micro-batch shapes, or stop) goes through the
coordination service's key-value store (:mod:`step3_jax.runtime.transport`, the one place that
uses a private JAX API).

Failure handling: a dead peer closes its sockets and every pending transfer fails at once (the
process then exits non-zero); a peer that vanishes without closing them is caught by
``jax.distributed``'s heartbeat; a live peer that stops sending is caught by the watchdog
(:class:`Transport`): no transfer completing for ``--peer-timeout`` seconds while some are
pending ends the process with a one-line error. Every key-value wait has the same timeout.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from step3_jax.checkpoint.loader import load, model_config
from step3_jax.errors import Step3Error
from step3_jax.model.weights import Moe, declare, is_spec
from step3_jax.runtime import afd, afd_schedule
from step3_jax.runtime.launch import ProcessGroup
from step3_jax.runtime.transport import Kv, Transport

log = logging.getLogger("step3_jax")

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
    """The ``keep`` tree of ``role`` (``loader.load(keep=...)``)."""
    ffn = ffn_part(cfg)
    return ffn if role == "ffn" else jax.tree.map(lambda x: not x, ffn)


def load_part(args, plan, devices, role: str):
    """This process's weights only (``--checkpoint``: Hub tensors or orbax arrays of the part
    alone; random weights: the part's leaves, identical to a whole-model init), each straight
    onto its AFD sharding; placed as :func:`afd.place` places them."""
    cfg = model_config(args.checkpoint, args.config, dtype=args.dtype, moe_impl=args.moe_impl,
                       attention_impl=args.attention_impl)
    shardings = afd.afd_shardings(cfg, plan, devices)
    params, cfg = load(args.checkpoint, args.config, dtype=args.dtype, seed=args.seed,
                       moe_impl=args.moe_impl, attention_impl=args.attention_impl,
                       progress=not args.quiet, shardings=shardings,
                       expert_parallel=plan.ffn_ep, keep=part(cfg, role))
    return place_part(params, cfg, plan, devices, role), cfg, params


def place_part(params, cfg, plan, devices, role: str, remote=None):
    """:func:`afd.place` for one side: an :class:`afd.AfdModel` with only this role's weights
    (``attn`` or ``ffn``; the other empty)."""
    attn_mesh, ffn_mesh = afd.group_meshes(plan, devices)
    if role == "attention":
        attn, local = afd.place_attention(params, attn_mesh)
        return afd.AfdModel(cfg, plan, attn_mesh, ffn_mesh, attn, (), local=local, remote=remote)
    return afd.AfdModel(cfg, plan, attn_mesh, ffn_mesh, None,
                        afd.place_ffn(params, cfg, plan, devices), remote=remote)


def part_bytes(params) -> int:
    """Bytes of the weights a process loaded (global sizes, each weight once)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


# ----- the two sides -------------------------------------------------------------------------------

def payload_abstract(cfg, plan, layer: int, rows: int, length: int, device) -> list:
    """What the attention group sends for ``layer`` and a micro-batch ``[rows, length]``, in
    ``jax.tree.leaves((q, scale, routing))`` order (``afd_schedule.attention_step``'s third
    output)."""
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
    ``afd_schedule.stack_pass``): per pass a header with every micro-batch's shard shapes, then per
    layer and micro-batch :meth:`exchange`: each attention device's payload goes straight from
    that device, and its rows of the FFN output come straight back to it."""

    def __init__(self, transport: Transport, kv: Kv, cfg, plan, group: ProcessGroup,
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


def serve_ffn(m, transport: Transport, kv: Kv, group: ProcessGroup) -> int:
    """The FFN process's loop: wait for a pass header (or stop), then per layer and micro-batch
    pull every attention shard's inputs, run ``afd_schedule.ffn_step`` on the FFN mesh and offer
    each shard's rows of the output back. All work of a pass is dispatched without waiting, so
    it runs as the inputs arrive. Returns the passes served."""
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
                    outs = afd_schedule.ffn_step(m.ffn[i], tuple(pieces), cfg=cfg)
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
    kv: Kv
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
    kv = Kv(timeout, me)
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
    session = start(args, plan, group)
    if session.role == "ffn":
        session.serve()
        return None
    # No profiler trace: the FFN devices are in another process, a trace here would miss them.
    results, metrics = session.run(afd.generate, session.model, prompts, profile=False, **knobs)
    metrics["processes"] = session.layout
    return results, metrics, session.cfg
