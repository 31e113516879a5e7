"""The processes of one run: how many, which one this is, and the few collectives the pipeline
needs (Lightning Fabric starts them; ``torch.distributed`` connects them).

A run asks for ``trainer.devices × trainer.num_nodes`` processes. With more than one,
:func:`launch` (called at the start of the run) hands the job to Lightning Fabric's DDP launcher:

- on one machine it starts the other ranks by re-running the same command (Hydra's run dir
  passed on), so ``lowbit trainer=ddp trainer.devices=4`` is all a user types;
- under SLURM (``srun``, ``hydra/launcher=slurm`` with ``tasks_per_node = trainer.devices``) or
  ``torchrun`` every rank is already running: Fabric reads the cluster's environment and only
  connects them.

Every rank then runs the same job: they quantize and calibrate identically (the data are
seeded), fine-tune as one DDP fit (each rank its slice of every step's batch), and share the
sampling (each its shards). Rank 0 alone owns the run folder: it decides whether the run is
skipped or resumed, writes results.json and logs to W&B; :func:`broadcast` passes its decisions on.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from lowbit.config import ConfigError

#: environment variables set by an external launcher (SLURM, torchrun) or by Fabric's own
_RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def requested_world(trainer_cfg: Any) -> int:
    """Processes a ``trainer`` config asks for: ``devices × num_nodes`` (1 without a trainer)."""
    if trainer_cfg is None:
        return 1
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1) or 1
    if not isinstance(devices, (int, str)):  # a list of device ids
        devices = len(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError("trainer.devices", devices, "must be a positive number of processes "
                          "per node", "pass trainer.devices=1 (one process) or e.g. "
                          "trainer.devices=2")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError("trainer.num_nodes", nodes, "must be a positive integer",
                          "pass trainer.num_nodes=1")
    return devices * nodes


def spawns_for_fit(trainer_cfg: Any) -> bool:
    """True when the Trainer spawns its own processes for the fit only (ddp_spawn / ddp_fork):
    the run itself stays one process."""
    strategy = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    if isinstance(strategy, str):
        return "spawn" in strategy or "fork" in strategy
    return strategy is not None and strategy.get("start_method") in ("spawn", "fork", "forkserver")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; a no-op in one process)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def launched_externally() -> bool:
    """True when this process is one rank of processes started by SLURM, torchrun or Fabric."""
    return any(k in os.environ for k in _RANK_ENV)


def _under_hydra() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.initialized()
    except Exception:  # noqa: BLE001
        return False


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra there is no sweep
        return False


def launch(cfg: Any) -> int:
    """Start (or join) the run's processes when its trainer asks for more than one; returns the
    world size. Called once per run, before anything else is computed."""
    world = requested_world(cfg.get("trainer"))
    if world <= 1 or is_distributed() or spawns_for_fit(cfg.get("trainer")):
        return world_size()
    if not launched_externally() and not _under_hydra():
        raise ConfigError(
            "trainer.devices", cfg.trainer.get("devices"),
            f"{world} processes are started by the `lowbit` command (or torchrun / srun), not "
            f"from inside another Python program", "run `lowbit ... trainer.devices=N`, or "
            "`torchrun --nproc-per-node N $(which lowbit) ...`")
    if _in_multirun() and not launched_externally():
        raise ConfigError(
            "trainer.devices", cfg.trainer.get("devices"),
            f"a run of {world} processes cannot start its ranks from inside a local `lowbit -m` "
            f"sweep (each rank would re-run the whole sweep)",
            "run the jobs one by one without -m, sweep on a cluster with hydra/launcher=slurm "
            "(one SLURM job of tasks_per_node = trainer.devices per run), or use "
            "trainer=ddp_spawn, which spreads only the fine-tuning over processes")
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    gpu = accelerator in ("gpu", "cuda") or accelerator == "auto" and torch.cuda.is_available()
    nodes = int(cfg.trainer.get("num_nodes") or 1)
    fabric = Fabric(accelerator="cuda" if gpu else "cpu", devices=world // nodes, num_nodes=nodes,
                    strategy=DDPStrategy(process_group_backend="nccl" if gpu else "gloo"))
    fabric.launch()
    if gpu:
        torch.cuda.set_device(fabric.local_rank)
    return world_size()


def shard(items: range | list, rank_: int | None = None, world: int | None = None) -> list:
    """The items of ``rank_`` when ``items`` are dealt round-robin over ``world`` ranks."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items)[r::w]
