"""Data parallelism over the processes ``torchrun`` starts: torch DDP or DeepSpeed ZeRO.

One process per GPU (or several on a CPU). Every rank plays its own share of the step's
episodes; the gradient of the global token-mean loss is what the engines average. The same
code runs on CPU (gloo) and CUDA (nccl): the backend follows the device.

:func:`resolve_device` turns the ``device`` key into a torch device (for every command);
:func:`standalone_env` gives a process started without torchrun the launcher's environment.
:class:`Dist` is the process group (rank, world size, collectives). :func:`make_engine` wraps
the student and its optimizer in one of three engines with one interface:

- ``PlainEngine`` (``distributed.engine=none``): the module and optimizer as they are;
- ``DDPEngine``: ``DistributedDataParallel``, full replicas, all-reduced gradients;
- ``DeepSpeedEngine``: ``deepspeed.initialize`` with a config built from ours (ZeRO stage,
  offload, bf16 on CUDA, fp32 on CPU), the client ``torch.optim.AdamW`` (DeepSpeed's own
  optimizers would be compiled first) and DeepSpeed's checkpoints for resume.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError, DistributedConfig


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``device`` of the config as a torch device: ``auto`` picks CUDA when present; with ``local_rank``, a bare
    ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    return torch.device(name)


def standalone_env() -> None:
    """The launcher environment (``MASTER_ADDR``/``MASTER_PORT``/``RANK``...) of a single process started without
    torchrun, on a free local port; left as it is when a launcher set it."""
    if "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


class Dist:
    """The process group of a run (a no-op group of one when ``engine=none``)."""

    def __init__(self, cfg: DistributedConfig):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and cfg.engine == "none":
            raise ConfigError(f"distributed.engine: expected ddp or deepspeed when launched on {self.world} processes "
                              "(torchrun), got 'none'")
        self.enabled = cfg.engine != "none"
        self._owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of this rank: with CUDA, GPU ``LOCAL_RANK``."""
        dev = resolve_device(name, local_rank=self.local_rank if self.enabled else None)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def init(self, device: torch.device) -> None:
        if not self.enabled or dist.is_initialized():
            return
        backend = self.cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        standalone_env()
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=self.cfg.timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
        self._owns_group = True

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """The reduction over ranks of ``values`` (a new tensor; returned as is with one process)."""
        if not self.enabled or self.world == 1:
            return values
        out = values.clone()
        dist.all_reduce(out, op=op)
        return out

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.enabled or self.world == 1:
            return list(values)
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.comm_device)).tolist()

    def any(self, flag: bool) -> bool:
        return self.sum_floats([float(flag)])[0] > 0

    @property
    def comm_device(self) -> torch.device:
        if self.enabled and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. fills a cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def shutdown(self, *, barrier: bool = True) -> None:
        """Barrier and destroy the group: gloo processes exiting without it may abort. After an error, no
        barrier (the other ranks may never reach it)."""
        if self._owns_group and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False


def whiten_global(x: torch.Tensor, d: Dist, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` over the union of every rank's ``x`` ([N] per rank): unbiased variance, float64 sums."""
    x64 = x.double()
    n, s1 = d.sum_floats([float(x64.numel()), float(x64.sum())])
    mean = s1 / n
    s2 = d.sum_floats([float(((x64 - mean) ** 2).sum())])[0]
    var = s2 / (n - 1) if n > 1 else 0.0
    return ((x64 - mean) / (var + eps) ** 0.5).float()


class PlainEngine:
    """One process: the policy and its optimizer, stepped directly."""

    zero3 = False

    def __init__(self, policy, optimizer, max_grad_norm: float | None):
        self.module, self.optimizer, self.max_grad_norm = policy, optimizer, max_grad_norm
        self.wrapped = policy

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> float | None:
        """Clip and step; returns the gradient norm, or None (no step) when it is not finite."""
        gn = None
        if self.max_grad_norm is not None:
            gn = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm))
            if not torch.isfinite(torch.tensor(gn)):
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.optimizer.step()
        return gn if gn is not None else float("nan")

    def gathered(self, params):
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict()

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def save_engine_state(self, path: Path) -> None:  # the optimizer travels in trainer_state.pt
        pass

    def load_engine_state(self, path: Path, trainer_state: dict) -> None:
        self.optimizer.load_state_dict(trainer_state["optimizer"])


class DDPEngine(PlainEngine):
    """torch DistributedDataParallel: every rank holds the full model and optimizer."""

    def __init__(self, policy, optimizer, max_grad_norm: float | None, device: torch.device):
        super().__init__(policy, optimizer, max_grad_norm)
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


class DeepSpeedEngine:
    """DeepSpeed ZeRO through ``deepspeed.initialize`` (called directly, not through Accelerate)."""

    def __init__(self, policy, optimizer, cfg: DistributedConfig, max_grad_norm: float | None,
                 device: torch.device, world: int):
        ds = import_deepspeed()
        self.zero3 = cfg.zero_stage == 3
        self.module = policy
        if self.zero3:
            # The fused loss reads the LM head's weight inside Policy.forward, outside the head's own
            # forward: registered as external, ZeRO-3 gathers it for Policy's forward and backward.
            from .models import lm_head

            for p in lm_head(policy.lm):
                if p is not None:
                    ds.zero.register_external_parameter(policy, p)
        config = deepspeed_config(cfg, max_grad_norm=max_grad_norm, device=device, world=world)
        self.engine, self.optimizer, _, _ = ds.initialize(model=policy, optimizer=optimizer, config=config)
        self.wrapped = self.engine
        self._ds = ds

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def gathered(self, params):
        params = [p for p in params if p is not None]
        if not params or not any(hasattr(p, "ds_id") for p in params):
            return contextlib.nullcontext()
        return self._ds.zero.GatheredParameters(params, modifier_rank=None)

    def full_state_dict(self) -> dict | None:
        """The consolidated weights on rank 0 (a collective under ZeRO-3), None on the other ranks."""
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return None if sd is None else dict(sd)
        return self.module.state_dict() if dist.get_rank() == 0 else None

    def optimizer_state(self) -> dict | None:
        return None  # sharded: saved by DeepSpeed

    def save_engine_state(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="state", save_latest=False)

    def load_engine_state(self, path: Path, trainer_state: dict) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"--resume: no DeepSpeed state under {path}")


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed.engine: deepspeed is not installed (pip install --no-build-isolation "
                          "deepspeed after torch; or use distributed.engine=ddp)") from None
    return deepspeed


def deepspeed_config(cfg: DistributedConfig, *, max_grad_norm: float | None, device: torch.device,
                     world: int) -> dict:
    """DeepSpeed's JSON config from ours. Our loss is already the global token mean (see the trainer), so one
    micro-batch per rank and no gradient accumulation."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if cfg.zero3_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        # fp16 is refused on the CPU and bf16 there differs between world sizes by ~1e-3: fp32 on the CPU.
        "bf16": {"enabled": device.type == "cuda"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_engine(cfg: DistributedConfig, policy, optimizer, *, max_grad_norm: float | None, device: torch.device,
                world: int):
    if cfg.engine == "none":
        return PlainEngine(policy, optimizer, max_grad_norm)
    if cfg.engine == "ddp":
        return DDPEngine(policy, optimizer, max_grad_norm, device)
    return DeepSpeedEngine(policy, optimizer, cfg, max_grad_norm, device, world)


def shard_teacher_zero3(teacher, cfg: DistributedConfig, device: torch.device, world: int):
    """ZeRO-3 inference for a frozen teacher too large for one device: parameters sharded over the ranks."""
    ds = import_deepspeed()
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold":
                                    cfg.zero3_persistence_threshold if cfg.zero3_persistence_threshold is not None
                                    else 100_000},
              "bf16": {"enabled": device.type == "cuda"}}
    engine = ds.initialize(model=teacher, config=config)[0]
    engine.module.eval()
    return engine.module
