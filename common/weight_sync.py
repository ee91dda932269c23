"""Versioned, packed weight transfer from the learner to the samplers over a collective (gloo on CPU, NCCL on GPU).

The learner's rank 0 and every sampler form a small process group of their own (a TCP store plus a gloo or NCCL
backend built directly, so it never touches the learner's FSDP group). A push is one header broadcast (version and
the layout: names, dtypes, shapes, offsets) and one broadcast per dtype of a flat buffer holding every tensor of
that dtype: a few large transfers, never one per parameter. The receivers unpack views into those buffers.

No Ray here: the learner and the sampler actors call these classes; tests use them from plain processes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class WeightSyncError(RuntimeError):
    """A push that could not be completed (peer gone, timeout, layout mismatch)."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in elements of its dtype's buffer


@dataclass(frozen=True)
class PackedLayout:
    version: int
    sizes: dict[str, int]  # dtype -> elements in its flat buffer
    slots: tuple[TensorSlot, ...]

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> PackedLayout:
        d = json.loads(raw.decode())
        return PackedLayout(
            int(d["version"]),
            {k: int(v) for k, v in d["sizes"].items()},
            tuple(TensorSlot(s["name"], s["dtype"], tuple(s["shape"]), int(s["offset"])) for s in d["slots"]),
        )


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight layout")
    return dtype


def pack(
    named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, device: torch.device | str = "cpu"
) -> tuple[PackedLayout, dict[str, torch.Tensor]]:
    """One flat buffer per dtype holding every tensor, and the layout that unpacks it."""
    items = [(n, t.detach()) for n, t in named_tensors]
    sizes: dict[str, int] = {}
    slots = []
    for name, t in items:
        key = str(t.dtype).removeprefix("torch.")
        slots.append(TensorSlot(name, key, tuple(t.shape), sizes.get(key, 0)))
        sizes[key] = sizes.get(key, 0) + t.numel()
    buffers = {k: torch.empty(n, dtype=_dtype(k), device=device) for k, n in sizes.items()}
    for slot, (_, t) in zip(slots, items, strict=True):
        buffers[slot.dtype][slot.offset : slot.offset + t.numel()].copy_(t.reshape(-1))
    return PackedLayout(version, sizes, tuple(slots)), buffers


def unpack(layout: PackedLayout, buffers: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Views into `buffers`, named and shaped as packed."""
    out = []
    for s in layout.slots:
        n = 1
        for d in s.shape:
            n *= d
        out.append((s.name, buffers[s.dtype][s.offset : s.offset + n].view(s.shape)))
    return out


def group_backend(member_gpus: list[list[str]]) -> str:
    """The weight group's backend from each member's GPUs ("node:gpu" names; [] without a GPU): NCCL only when every
    member has a GPU and no GPU is two members'. NCCL refuses two ranks on one device ("Duplicate GPU detected"), so a
    learner and a sampler sharing a GPU (fractional num_gpus, e.g. the whole service on one GPU) push over gloo."""
    names = [g for gpus in member_gpus for g in set(gpus)]
    if any(not gpus for gpus in member_gpus) or len(set(names)) < len(names):
        return "gloo"
    return "nccl"


class WeightGroup:
    """A process group of the learner's rank 0 (rank 0, the sender) and the samplers (ranks 1..N), independent of
    the default process group. `backend`: gloo (CPU tensors) or nccl (CUDA tensors). `name` keys the group in its
    store: a group re-formed after a member restarted gets a new name (and a new port)."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        name: str = "minillm-weights",
    ):
        if backend not in ("gloo", "nccl"):
            raise WeightSyncError(f"weight sync backend must be gloo or nccl, got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("the nccl weight sync backend needs a CUDA GPU in this process")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        store: Any
        try:
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - name the cause
            raise WeightSyncError(f"weight group rank {rank}: cannot reach the store at {host}:{port}: {exc}") from exc
        store = dist.PrefixStore(name, store)
        self.pg: Any  # ProcessGroupGloo or ProcessGroupNCCL (their stubs lack broadcast)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        self._store = store  # keeps the TCP store (the master's server) alive with the group

    def _broadcast(self, tensor: torch.Tensor) -> None:
        self.pg.broadcast([tensor], _root(0)).wait()

    def broadcast_bytes(self, raw: bytes | None) -> bytes:
        """Rank 0's bytes to every rank (a length, then the bytes)."""
        length = torch.tensor([len(raw) if raw is not None else 0], dtype=torch.int64, device=self.device)
        self._broadcast(length)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0 and raw:
            data.copy_(torch.frombuffer(bytearray(raw or b""), dtype=torch.uint8))
        self._broadcast(data)
        return bytes(data.cpu().numpy().tobytes())

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - older backends have no shutdown
            pass


def _root(rank: int) -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = rank
    opts.rootTensor = 0
    return opts


class WeightSender:
    """Rank 0: `send(named_tensors, version)` packs and broadcasts; with `background=True` the transfer runs on a
    thread so the learner can go on (the next send, or `wait()`, joins it and re-raises its error)."""

    def __init__(self, group: WeightGroup):
        if group.rank != 0:
            raise WeightSyncError("the sender is rank 0 of the weight group")
        self.group = group
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_version = 0

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, background: bool = False) -> None:
        self.wait()
        if version <= self.last_version:
            raise WeightSyncError(f"weight version must increase: sent {self.last_version}, got {version}")
        layout, buffers = pack(named_tensors, version, self.group.device)
        self.last_version = version
        if not background:
            self._transfer(layout, buffers)
            return

        def run() -> None:
            try:
                self._transfer(layout, buffers)
            except BaseException as exc:  # noqa: BLE001 - surfaced by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"weight-push-{version}", daemon=True)
        self._thread.start()

    def _transfer(self, layout: PackedLayout, buffers: dict[str, torch.Tensor]) -> None:
        self.group.broadcast_bytes(layout.to_bytes())
        for key in sorted(buffers):
            self.group._broadcast(buffers[key])

    def abandon(self) -> None:
        """Leave the group for good (a member died: the group is re-formed): shut it down, which ends a transfer
        still under way with an error on every side, and drop that transfer and its error."""
        self.group.close()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        self._thread, self._error = None, None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise WeightSyncError(f"weight push failed: {err}") from err


class WeightReceiver:
    """Ranks 1..N: `receive()` blocks for the next push and returns (version, named tensors)."""

    def __init__(self, group: WeightGroup):
        if group.rank == 0:
            raise WeightSyncError("rank 0 of the weight group is the sender")
        self.group = group

    def receive(self) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        layout = PackedLayout.from_bytes(self.group.broadcast_bytes(None))
        device = self.group.device
        buffers = {k: torch.empty(n, dtype=_dtype(k), device=device) for k, n in sorted(layout.sizes.items())}
        for key in sorted(buffers):
            self.group._broadcast(buffers[key])
        return layout.version, unpack(layout, buffers)
