"""The channel between the processes of a multi-process AFD run
(:mod:`step3_jax.runtime.distributed`).

* Control — transfer-server addresses, the handshake, one header per pass — goes through the
  coordination service's key-value store (:class:`Kv`, every wait bounded), reached by
  :func:`_kv_store`, the one place that uses a private JAX API.
* Data — activations, scales, routing and results — goes device to device through JAX's own
  transfer server (``jax.experimental.transfer``, :class:`Transport`), with a watchdog that ends
  the process with a one-line error when a live peer stops sending.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Callable, Sequence

import jax

from step3_jax.errors import Step3Error
from step3_jax.runtime.launch import ProcessGroup

ENV_TRANSFER_HOST = "STEP3_JAX_TRANSFER_HOST"  # the address peers reach this process's server at
_PREFIX = "step3_jax/afd"


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


class Kv:
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

    def __init__(self, kv: Kv, group: ProcessGroup, timeout: float,
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
