"""FSDP2 through accelerate's FSDP plugin: sharded parameters, gradients and optimizer states.

With ``fsdp: true`` every decoder layer (the model's ``_no_split_modules``, or
``fsdp_layer_class``) is one FSDP2 unit: each process holds 1/N of every parameter as an fp32
master shard, AdamW's states live beside that shard, and a layer's full weights exist only
while it runs, all-gathered in ``param_dtype`` (bf16 when ``mixed_precision: bf16``; FSDP's
``MixedPrecisionPolicy``, gradients reduced in fp32). ``gradient_checkpointing`` becomes the
plugin's activation checkpointing of the same layers.

accelerate enables its FSDP plugin only for accelerator devices; on CPU (gloo, the tests)
``make_fsdp_accelerator`` marks accelerate's state as FSDP itself, after which ``prepare``,
``backward``, ``no_sync`` and ``clip_grad_norm_`` run accelerate's own FSDP2 code: the same
code as on GPUs.

The engine cannot decode from shards, so RL stages under FSDP keep a plain copy of the
weights for rollouts (``full_copy`` / ``copy_full_weights``: one all-gather per parameter
after every update). Checkpoints are sharded (``npr.train.checkpoint``); ``final/`` is a plain
``save_pretrained`` directory gathered on the main process (``full_state_dict``).
"""

from __future__ import annotations

import os

import torch

from npr.train.config import ConfigError

_AC_PREFIX = "_checkpoint_wrapped_module."


def world_size_from_env() -> int:
    """Processes of the launch (torchrun / accelerate launch set WORLD_SIZE), before any setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_fsdp_launch(config) -> None:
    """FSDP needs several processes: refuse one before anything is loaded, naming the fix."""
    if getattr(config, "fsdp", False) and world_size_from_env() < 2:
        raise ConfigError(
            "config field 'fsdp': FSDP shards the model over processes and this launch has one; "
            "launch N >= 2 processes (torchrun --nproc_per_node N -m npr.cli.main …, or accelerate "
            "launch --num_processes N …), or drop --fsdp to train on one process"
        )


def layer_classes(model, config) -> list[str]:
    """Names of the layer classes FSDP wraps as units; ``ConfigError`` if the model has none."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    names = (
        [n.strip() for n in config.fsdp_layer_class.split(",") if n.strip()]
        if config.fsdp_layer_class
        else list(getattr(model, "_no_split_modules", None) or [])
    )
    if not names:
        raise ConfigError(
            f"config field 'fsdp_layer_class': {type(model).__name__} declares no layer class to "
            "shard (_no_split_modules is empty); pass --fsdp-layer-class with its decoder layer class "
            "name (e.g. Qwen3DecoderLayer), or drop --fsdp"
        )
    missing = [n for n in names if get_module_class_from_name(model, n) is None]
    if missing:
        raise ConfigError(
            f"config field 'fsdp_layer_class': {type(model).__name__} has no module of class "
            f"{', '.join(missing)}, so FSDP cannot wrap it; pass --fsdp-layer-class with the name of its "
            "decoder layer class (the class repeated once per layer), or drop --fsdp"
        )
    return names


def fsdp_plugin(config, layers: list[str]):
    """accelerate's ``FullyShardedDataParallelPlugin`` (FSDP2) for ``config``."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=layers,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        activation_checkpointing=config.gradient_checkpointing,
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
        cpu_offload=_offload_policy(config),
    )


def _offload_policy(config):
    """FSDP2's CPU offload of the shards with ``cpu_offload`` (else False): pinned host memory for fast
    copies to a CUDA device; unpinned where there is none (pinning needs an accelerator)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if not getattr(config, "cpu_offload", False):
        return False
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())


def make_fsdp_accelerator(plugin):
    """An ``Accelerator`` whose ``prepare`` shards with ``plugin`` (on CPU too; see the module doc)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if accelerator.distributed_type != DistributedType.FSDP:  # CPU: accelerate ignored the plugin
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return accelerator


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def canonical_name(name: str) -> str:
    """A parameter name without activation checkpointing's wrapper prefix."""
    return name.replace(_AC_PREFIX, "")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def copy_full_weights(sharded, target: torch.nn.Module) -> None:
    """Gather every parameter of ``sharded`` (one all-gather each: call on every process) into
    the plain module ``target``, cast to its dtype; buffers are copied too."""
    params = dict(target.named_parameters())
    for name, p in sharded.named_parameters():
        params[canonical_name(name)].copy_(_full(p.detach()).to(params[canonical_name(name)].dtype))
    buffers = dict(target.named_buffers())
    for name, b in sharded.named_buffers():
        if canonical_name(name) in buffers:
            buffers[canonical_name(name)].copy_(_full(b))


def full_copy(sharded, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A plain (unsharded) copy of the sharded model in ``dtype`` on ``device``, for the engine:
    built on the meta device from the model's config, then filled by ``copy_full_weights``."""
    from transformers import AutoModelForCausalLM

    config = sharded.config
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    copy.to_empty(device=device)
    copy_full_weights(sharded, copy)
    if getattr(config, "tie_word_embeddings", False):
        copy.tie_weights()
    return copy.eval().requires_grad_(False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU of the main process (empty elsewhere); every
    process must call it. Names without the activation checkpointing prefix."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {canonical_name(k): v for k, v in state.items()}
