"""torch.distributed for genlab: data-parallel SVI and sharded evaluation under ``torchrun``.

Nothing here is home-made transport: the process group is ``torch.distributed``'s, initialized
from the environment variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), gloo on CPU and NCCL on CUDA (docs/distributed.md).

A process started without ``torchrun`` (or with one process) gets :data:`SINGLE`, whose
methods do nothing: a plain run computes exactly what it computed before.

Every collective is wrapped so that a rank that died (gloo sees its socket close) or stalled
(the process group's ``timeout``, ``--dist-timeout``) makes the others stop with one
:class:`PeerLost` sentence instead of hanging or printing a C++ traceback.
"""

from __future__ import annotations

import hashlib
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from models.common import GenlabError

#: Default seconds a rank waits for the others in one collective (``--dist-timeout``).
DEFAULT_TIMEOUT = 300.0


class PeerLost(GenlabError):
    """Another rank died, stalled past the timeout, or never joined."""

    exit_code = 4


class Lockstep(GenlabError):
    """An error every rank raises alike (a bad world size, or rank 0's error passed on to the
    others by :meth:`Dist.from_main`): rank 0 prints it, the others stay quiet."""

    lockstep = True


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of integers/strings (blake2b): independent streams for
    ``(seed, rank)``, ``(seed, block, cell)``, ... that do not collide like ``seed + i`` does."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise GenlabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclass
class Dist:
    """This process's place in the process group; ``size == 1``: a plain process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ devices
    def device(self, device: str) -> torch.device:
        """The rank's device: ``cuda`` means ``cuda:LOCAL_RANK`` when several ranks share a node."""
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and self.active:
            d = torch.device("cuda", self.local_rank)
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise GenlabError(f"--device {device}: CUDA is not available on this machine "
                                  f"({socket.gethostname()})")
            if (d.index or 0) >= torch.cuda.device_count():
                raise GenlabError(f"--device {device}: rank {self.rank} needs cuda:{d.index}, but "
                                  f"this node has {torch.cuda.device_count()} GPU(s); start at "
                                  "most that many processes per node")
            torch.cuda.set_device(d)
        return d

    # ------------------------------------------------------------------ collectives
    @contextmanager
    def _guard(self, what: str):
        try:
            yield
        except RuntimeError as e:  # gloo/NCCL: DistBackendError, DistNetworkError, timeouts
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PeerLost(
                f"rank {self.rank} of {self.size} lost the other ranks during {what} ({first}): "
                f"another rank died, failed (its own error is printed above), or stalled for "
                f"more than --dist-timeout {self.timeout:g} s; continue from the last "
                "checkpoint with --resume") from None

    def all_reduce(self, tensor: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (nothing on a plain process)."""
        if self.active:

            with self._guard(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, what: str = "agreeing on a flag") -> bool:
        """True on every rank when it is true on one (a plain process: ``flag``)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        return bool(self.all_reduce(t, what).item() > 0)

    def all_gather_object(self, obj, what: str = "gathering results") -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.active:
            return [obj]

        out = [None] * self.size
        with self._guard(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, what: str = "receiving rank 0's state"):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj

        box = [obj if self.main else None]
        with self._guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors, what: str = "receiving rank 0's parameters") -> None:
        """Overwrite ``tensors`` with rank 0's values, in place."""
        if not self.active:
            return

        with self._guard(what), torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def from_main(self, fn: Callable, send: bool = False, what: str = "setting up"):
        """Run ``fn`` on rank 0 only; its GenlabError stops every rank (as :class:`Lockstep` on
        the others).  Returns ``fn()`` on rank 0, and on the others its result when ``send``
        (a picklable value), else None."""
        if not self.active:
            return fn()
        result, failure = None, None
        if self.main:
            try:
                result = fn()
            except GenlabError as e:
                failure = (str(e), getattr(e, "exit_code", 2))
                self.broadcast_object(("error", failure), what)
                raise
        got = self.broadcast_object(("ok", result if send else None), what)
        if got[0] == "error":
            err = Lockstep(got[1][0])
            err.exit_code = got[1][1]
            raise err
        return result if self.main else got[1]

    def all_reduce_grads(self, params: list) -> None:
        """Sum ``p.grad`` over the ranks, one flat buffer per dtype; a parameter no rank gave a
        gradient keeps ``grad=None`` (so Adam skips it exactly as a plain process does)."""
        if not self.active:
            return
        groups: dict = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), ps in groups.items():
            has = torch.tensor([0.0 if p.grad is None else 1.0 for p in ps], dtype=dtype,
                               device=device)
            flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                              for p in ps] + [has])
            self.all_reduce(flat, "the gradient all-reduce")
            offset = 0
            for p in ps:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n
            for p, h in zip(ps, flat[offset:].tolist()):
                if h == 0:
                    p.grad = None

    def _comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self, device: torch.device) -> dict:
        """``config.json``'s record: world size, backend, and each rank's device and host."""
        mine = {"rank": self.rank, "device": str(device), "host": socket.gethostname()}
        ranks = self.all_gather_object(mine, "recording the ranks' devices")
        return {"world_size": self.size, "backend": self.backend,
                "devices": [r["device"] for r in ranks], "hosts": [r["host"] for r in ranks]}

    def close(self) -> None:
        if self.active:

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Dist()
_CURRENT: Optional[Dist] = None


def current() -> Dist:
    """The process group this process joined (:func:`setup`), else :data:`SINGLE`."""
    return _CURRENT or SINGLE


def setup(device: str = "cpu", timeout: Optional[float] = None,
          backend: Optional[str] = None) -> Dist:
    """Join torchrun's process group (once per process) or, without torchrun, :data:`SINGLE`.

    The backend follows ``device`` (gloo on CPU, NCCL on CUDA) unless given (evaluation
    gathers Python objects only: gloo); on CUDA each rank's current device is
    ``cuda:LOCAL_RANK``.  ``timeout`` (seconds) bounds the rendezvous and every collective: a
    rank waiting longer stops with :class:`PeerLost`.
    """
    global _CURRENT
    size = world_size_from_env()
    if size == 1:
        return SINGLE
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not timeout > 0:
        raise GenlabError(f"--dist-timeout must be a positive number of seconds, got {timeout}")

    if _CURRENT is not None and dist.is_initialized():
        return _CURRENT
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise GenlabError(f"WORLD_SIZE={size} but {var} is not set: start distributed runs "
                              "with torchrun (docs/distributed.md)")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or backend_for(device)
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise GenlabError(f"--device {device}: CUDA is not available on rank {rank} "
                              f"({socket.gethostname()})")
        torch.cuda.set_device(local % torch.cuda.device_count())
    d = Dist(rank, size, local, backend, timeout)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    with d._guard(f"the rendezvous at {where}"):
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                rank=rank, world_size=size)
    _CURRENT = d
    return d


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
        _CURRENT = None


def share(n: int, rank: int, size: int) -> tuple:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items split ``size`` ways
    (equal shares when ``size`` divides ``n``; shares differ by at most one otherwise)."""
    return (rank * n) // size, ((rank + 1) * n) // size
