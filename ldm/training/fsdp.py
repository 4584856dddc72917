"""FSDP2 (torch.distributed.fsdp.fully_shard, through Accelerate) on GPUs and on a CPU, and EMA under it.

    accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml train/train_ldm.py --model tiny ...

* `allow_fsdp_on_cpu`: Accelerate 1.15 turns FSDP on only for GPU-like devices (AcceleratorState sets
  DistributedType.FSDP inside its MULTI_GPU/NPU/XPU/... branch; several CPU processes are MULTI_CPU, where
  ACCELERATE_USE_FSDP is ignored and the model is silently wrapped in DDP). torch's fully_shard itself runs on a
  CPU over gloo (all_gather_into_tensor, reduce_scatter_tensor), so we hand Accelerate the plugin its launcher
  asked for and mark the state FSDP: from there on `prepare`, `clip_grad_norm_`, `save_state` and `load_state`
  are Accelerate's own FSDP2 code.
* `ShardedEMA`: each rank keeps the EMA of its own shard of every parameter (DTensor.to_local(): about 1/world of
  the model), with diffusers' EMAModel doing the arithmetic and the decay schedule on those local tensors.
  EMAModel alone cannot: it clones what it is given (before `prepare`: a whole UNet on every rank), and Accelerate
  saves a registered object from the main process only (its shard alone), so here each rank writes its own shard
  with torch.distributed.checkpoint and reads it back; the pipeline gets the EMA gathered once, at save time.
"""
from __future__ import annotations

import os

import torch

EMA_FOLDER = "ema_sharded"  # beside Accelerate's files in checkpoint-N/accelerate/: one .distcp file per rank


def fsdp_requested() -> bool:
    """Returns whether `accelerate launch` was given an FSDP config (it sets ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def allow_fsdp_on_cpu(accelerator) -> None:
    """Turns a multi-process CPU (gloo) Accelerator into an FSDP one when the launcher asked for FSDP.

    Only FSDP2 (fsdp_version: 2): Accelerate's FSDP1 path stops on a CPU, in its plugin with sync_module_states
    ("There are currently no available devices found, must be one of 'XPU', 'CUDA', ...") or, without it, in
    FullyShardedDataParallel ("Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0"); raises
    ValueError naming the fix for fsdp_version 1.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set from the config file
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on a CPU runs only as FSDP2: set fsdp_version: 2 in the Accelerate config "
                         "(configs/accelerate/fsdp_cpu_2proc.yaml)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP  # AcceleratorState's shared state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """Returns this rank's shard of a DTensor parameter (a view, no copy), or `p` itself when it is not one."""
    return p.to_local() if hasattr(p, "to_local") else p


def shard_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """Returns (elements this rank holds, elements of the whole model) over the model's parameters."""
    local = sum(local_tensor(p).numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())  # a DTensor's numel is the global one


def unsharded_class(module: torch.nn.Module) -> type:
    """Returns the module's own class: fully_shard swaps it in place for FSDP<Name>(FSDPModule, <Name>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _local_views(parameters) -> list[torch.nn.Parameter]:
    # Parameters aliasing each local shard's storage, with the parameter's requires_grad: what EMAModel reads
    # (it copies frozen ones instead of averaging them).
    return [torch.nn.Parameter(local_tensor(p).detach(), requires_grad=p.requires_grad) for p in parameters]


class ShardedEMA:
    """EMA of this rank's shards of FSDP2 parameters: diffusers' EMAModel over the local tensors."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        # (mesh, placements, global shape, global stride) of each parameter: how to put a shard back in place
        self.layouts = [(p.device_mesh, p.placements, p.shape, p.stride()) if hasattr(p, "device_mesh") else None
                        for _, p in named]
        self.ema = EMAModel(_local_views(p for _, p in named), decay=decay)  # shadow: (local shard) per parameter

    def step(self, parameters) -> None:
        self.ema.step(_local_views(parameters))

    def _sharded(self) -> list[torch.Tensor]:
        # Each shadow shard as a DTensor with its parameter's layout (aliasing the shard: no copy).
        from torch.distributed.tensor import DTensor

        return [s if layout is None else DTensor.from_local(s, layout[0], layout[1], run_check=False,
                                                             shape=layout[2], stride=layout[3])
                for s, layout in zip(self.ema.shadow_params, self.layouts)]

    def gathered(self) -> dict[str, torch.Tensor] | None:
        """Returns {name: whole EMA tensor} on the main process, None on the others (every rank must call it;
        gathered one parameter at a time)."""
        main = torch.distributed.get_rank() == 0
        out = {}
        for name, s in zip(self.names, self._sharded()):
            whole = s.full_tensor() if hasattr(s, "full_tensor") else s
            if main:
                out[name] = whole.detach().cpu().clone()
        return out if main else None

    def state_dict(self) -> dict:
        """Returns EMAModel's state (decay, step, ...) with this rank's shards as "shadow_params"."""
        return self.ema.state_dict()

    def save(self, folder: str) -> None:
        """Writes every rank's shards and the EMA step under folder/ema_sharded (all ranks call it)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=os.path.join(folder, EMA_FOLDER))

    def load(self, folder: str) -> None:
        """Reads back what `save` wrote into this rank's shards (in place) and the EMA step."""
        import torch.distributed.checkpoint as dcp

        path = os.path.join(folder, EMA_FOLDER)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was written without the sharded EMA "
                                    "(use_ema false); resume it with --use-ema false")
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=path)
        self.ema.optimization_step = int(state["optimization_step"])

    def _dcp_state(self) -> dict:
        # DTensors: DCP writes each rank's shard once and could reshard them for another number of ranks.
        return {"optimization_step": self.ema.optimization_step, **dict(zip(self.names, self._sharded()))}


def register_sharded_ema(accelerator, ema: ShardedEMA) -> None:
    """Makes accelerator.save_state / load_state write and read the sharded EMA beside the model (every rank)."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: ema.save(output_dir))
    accelerator.register_load_state_pre_hook(lambda models, input_dir: ema.load(input_dir))
