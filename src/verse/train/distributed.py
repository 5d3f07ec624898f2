"""The process group of a `torchrun` launch: the `parallel:` section, rank/world from the environment, the
DeviceMesh, and the few collectives the training loop needs (all `torch.distributed`; nothing home-made).

`torchrun --nproc-per-node N -m verse train CONFIG.yaml parallel.dp_shard=N` sets `WORLD_SIZE`, `RANK` and
`LOCAL_RANK`; `init_distributed` reads them, starts NCCL (CUDA) or gloo (CPU) with a timeout, and lays the
ranks out as a mesh `dp_replicate x dp_shard x ep x tp` (the order of torchtitan's `ParallelDims`).
"""

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from verse.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "ep", "tp")
# how gloo and NCCL word a lost peer or a collective timeout
COMM_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out",
                 "Socket Timeout", "NCCL error", "ProcessGroupNCCL", "ProcessGroupGloo")


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel:` section of a training config.

    Attributes:
        dp_replicate (int): data-parallel replicas (full copies, gradients all-reduced; HSDP with dp_shard).
        dp_shard (int): FSDP2 ranks each holding 1/dp_shard of every parameter; -1 = every rank left over.
        tp (int): tensor-parallel ranks.
        ep (int): expert-parallel ranks: each holds n_routed_experts/ep of every MoE layer's experts and reads its
            own data (a data-parallel dimension for every other weight).
        cpu_offload (bool): FSDP2 keeps sharded parameters, gradients and optimizer states in CPU memory.
        timeout_s (float): a collective that waits longer than this (a dead or hung rank) ends every rank.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    ep: int = 1
    cpu_offload: bool = False
    timeout_s: float = 600.0

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "ParallelConfig":
        """Build from the `parallel:` mapping, naming the first bad key or value in one line."""
        if data is None:
            data = {}
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: parallel: expected a mapping (dp_replicate, dp_shard, tp, ep), "
                              f"got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: parallel: unknown key(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        for name in ("dp_replicate", "dp_shard", "tp", "ep"):
            value = data.get(name, getattr(cls, name))
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or
                                                                           (name == "dp_shard" and value == -1))
            if not ok:
                extra = " or -1 (every rank left over)" if name == "dp_shard" else ""
                raise ConfigError(f"{source}: parallel.{name}: must be a positive integer{extra}, got {value!r}")
        if not isinstance(data.get("cpu_offload", False), bool):
            raise ConfigError(f"{source}: parallel.cpu_offload: must be true or false, got {data['cpu_offload']!r}")
        timeout = data.get("timeout_s", cls.timeout_s)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"{source}: parallel.timeout_s: must be a positive number of seconds, got {timeout!r}")
        return cls(**{**data, "timeout_s": float(timeout)})

    def resolve(self, world_size: int) -> "ParallelConfig":
        """The layout for `world_size` ranks (dp_shard=-1 filled in).

        Raises:
            ConfigError: when dp_replicate * dp_shard * tp * ep is not `world_size`.
        """
        others = self.dp_replicate * self.tp * self.ep
        shard = self.dp_shard
        if shard == -1:
            shard = world_size // others if world_size % others == 0 else 0
        if shard < 1 or others * shard != world_size:
            shown = "-1 (the rest)" if self.dp_shard == -1 else self.dp_shard
            launch = ("one process: launch with `torchrun --nproc-per-node N -m verse train ...` for more"
                      if world_size == 1 else f"WORLD_SIZE={world_size} processes")
            raise ConfigError(f"parallel: dp_replicate {self.dp_replicate} x dp_shard {shown} x tp {self.tp} x ep "
                              f"{self.ep} must equal the number of ranks, but this is {launch}; "
                              f"change the parallel section or --nproc-per-node")
        return dataclasses.replace(self, dp_shard=shard)

    @property
    def degrees(self) -> Dict[str, int]:
        """Mesh dimension sizes in `MESH_DIMS` order."""
        return {name: getattr(self, name) for name in MESH_DIMS}


@dataclass
class Dist:
    """Where this process stands in the job. One process (no torchrun) is `Dist()`: rank 0 of 1, no mesh.

    Attributes:
        rank (int): global rank.
        world_size (int): number of processes.
        local_rank (int): rank on this node (the CUDA device index).
        device (torch.device): this rank's device.
        parallel (ParallelConfig): the resolved layout.
        mesh (Optional[DeviceMesh]): `dp_replicate x dp_shard x ep x tp`, with flattened `dp` (all data-parallel
            dimensions: they read different data) and `dp_shard_ep` (the FSDP2 shard dimension of dense weights).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: ParallelConfig = ParallelConfig(dp_shard=1)
    mesh: Optional[Any] = None

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data shard (ranks of one tensor-parallel group read the same data)."""
        return self.mesh["dp"].get_local_rank() if self.enabled else 0

    @property
    def dp_size(self) -> int:
        """Number of data shards."""
        return self.mesh["dp"].size() if self.enabled else 1

    def sum(self, value: float) -> float:
        """`value` summed over the data-parallel ranks (the ranks of one tp group hold the same value)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (a non-finite loss skips the step everywhere)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_object(self, obj: Any, group: str = "dp") -> list:
        """Every rank of mesh dimension `group` gets the list of their `obj`s, in rank order."""
        if not self.enabled:
            return [obj]
        sub = self.mesh[group]
        out = [None] * sub.size()
        dist.all_gather_object(out, obj, group=sub.get_group())
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable value, e.g. a config dict)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (also after another rank was lost: then only this rank's side is torn down)."""
        if self.enabled and dist.is_initialized():
            with contextlib.suppress(RuntimeError):
                dist.destroy_process_group()


def is_comm_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank died or hung (its connection closed, or
    `parallel.timeout_s` passed): c10d's `DistError`, or the RuntimeError gloo raises."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in COMM_FAILURES)


def env_world() -> tuple:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without it.

    Raises:
        ConfigError: malformed values.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world} (launch with torchrun)")
    return rank, world, local


def init_distributed(parallel: ParallelConfig, device: torch.device) -> Dist:
    """Join the job torchrun started (or stay one process), and build the DeviceMesh.

    Args:
        parallel (ParallelConfig): the `parallel:` section.
        device (torch.device): the configured device; CUDA becomes `cuda:LOCAL_RANK`.

    Returns:
        Dist: this rank's place; `Dist.close()` leaves the group.

    Raises:
        ConfigError: the layout does not match WORLD_SIZE (checked on every rank before any communication).
    """
    rank, world, local = env_world()
    layout = parallel.resolve(world)
    if world == 1:
        return Dist(device=device, parallel=layout)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=layout.timeout_s))
    return Dist(rank=rank, world_size=world, local_rank=local, device=device, parallel=layout,
                mesh=device_mesh(device.type, layout))


def device_mesh(device_type: str, layout: ParallelConfig):
    """The job's `DeviceMesh` over the initialised process group: `MESH_DIMS`, plus the flattened `dp` and
    `dp_shard_ep` (see `Dist`).

    Args:
        device_type (str): "cuda" or "cpu".
        layout (ParallelConfig): the resolved layout (its degrees multiply to the world size).

    Returns:
        DeviceMesh: the mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, tuple(layout.degrees.values()), mesh_dim_names=MESH_DIMS)
    mesh[("dp_replicate", "dp_shard", "ep")]._flatten("dp")
    mesh[("dp_shard", "ep")]._flatten("dp_shard_ep")
    return mesh
