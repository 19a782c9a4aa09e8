"""FSDP2 (PyTorch's ``fully_shard``) for the shared-backbone model, the engine besides DeepSpeed.

``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` sets ``ACCELERATE_USE_FSDP`` and
the ``FSDP_*`` settings; ``Runtime`` reads them here and shards the ``AlignModel`` itself with
``torch.distributed.fsdp.fully_shard``, instead of handing the model to ``Accelerator.prepare``:

* accelerate enables FSDP only on accelerators (on CPU processes it silently runs plain replicas),
  so its own path could not be tested on a machine without GPUs; torch's ``fully_shard`` runs on
  CPU over gloo, and the same code then runs on GPUs over NCCL.
* every trainable tensor of align lives in ``AlignModel.adapters`` / ``.heads``, outside the
  decoder layers (hooks apply them), so the grouping is fixed by align, not by a wrap policy:
  one shard group per decoder layer (frozen backbone weights only; LoRA on ``full`` is the
  exception, whose trainable copies sit in the layers) and one root group holding the embeddings,
  final norm, LM head and every adapter set and head. The root group is gathered for the whole
  forward, which is what the hooks that read adapter tensors from backbone modules need.
* ``fully_shard`` replaces each parameter by a sharded ``DTensor`` parameter. The optimizer, built
  from the unsharded parameters, is pointed at the new ones by name; a stage re-reads
  ``model.trainable_parameters()`` after ``Runtime.prepare`` (gradient clipping must see the
  parameters that get gradients).

Settings honoured: ``fsdp_reshard_after_forward`` and ``fsdp_offload_params`` (CPU offload of the
shards; meaningful on GPUs only), ``fsdp_transformer_layer_cls_to_wrap`` (class names of the blocks
to shard one by one; default: the backbone's decoder layers). Refused, with the setting to use:
``fsdp_version: 1``, ``fsdp_activation_checkpointing`` (``model.gradient_checkpointing``) and
``fsdp_cpu_ram_efficient_loading`` (every process reads the checkpoint, then keeps its shard).
``fsdp_state_dict_type`` does not apply: align saves adapters and heads as whole tensors and each
process's optimizer shard as plain tensors (``Runtime.optimizer_state``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from align.config import ConfigError


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True
    offload_params: bool = False
    layer_classes: tuple[str, ...] = ()  # empty: the backbone's decoder layers (align.arch)


def _env_flag(env, key: str, default: bool = False) -> bool:
    return env.get(key, str(default)).strip().lower() in ("true", "1", "yes")


def settings_from_env(env=None) -> FSDPSettings | None:
    """The FSDP settings ``accelerate launch`` exported, or None when FSDP was not asked for.
    Refuses the settings align does not run, naming the one to use instead."""
    env = os.environ if env is None else env
    if not _env_flag(env, "ACCELERATE_USE_FSDP"):
        return None
    where = "the accelerate config (configs/accelerate/fsdp2.yaml shows every setting)"
    if env.get("FSDP_VERSION", "1").strip() != "2":
        raise ConfigError(f"fsdp_version: {env.get('FSDP_VERSION', '1')} in {where}: align runs FSDP2 only "
                          f"(torch fully_shard); set fsdp_version: 2")
    if _env_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError(f"fsdp_activation_checkpointing: true in {where}: align checkpoints its own forward "
                          f"(roles, adapters, packing); set it to false and model.gradient_checkpointing=true")
    if _env_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ConfigError(f"fsdp_cpu_ram_efficient_loading: true in {where}: not supported by align (every process "
                          f"reads the checkpoint, then keeps only its shard); set it to false")
    names = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    return FSDPSettings(reshard_after_forward=_env_flag(env, "FSDP_RESHARD_AFTER_FORWARD", True),
                        offload_params=_env_flag(env, "FSDP_OFFLOAD_PARAMS"),
                        layer_classes=tuple(n.strip() for n in names.split(",") if n.strip()))


def check_precision(mixed_precision: str, dtype: str) -> None:
    """``accelerate launch --mixed_precision`` has no effect here (the model is not handed to
    accelerate): ``model.dtype`` decides. One naming another precision is refused."""
    same = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}.get(dtype, "no")
    if mixed_precision not in ("no", same):
        raise ConfigError(f"accelerate's mixed_precision={mixed_precision} but model.dtype={dtype}: under FSDP2 "
                          f"model.dtype decides the precision; drop --mixed_precision (or set it to no), and set "
                          f"model.dtype={'bfloat16' if mixed_precision == 'bf16' else 'float16'} for that precision")


def shard_groups(model, settings: FSDPSettings) -> list[torch.nn.Module]:
    """The modules sharded as groups of their own, innermost first: the decoder layers (or the
    modules of the named classes), the ``AlignModel`` root last."""
    if settings.layer_classes:
        blocks = [m for m in model.backbone.modules() if type(m).__name__ in settings.layer_classes]
        found = {type(m).__name__ for m in blocks}
        missing = [n for n in settings.layer_classes if n not in found]
        if missing:
            raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which the backbone does not "
                              f"contain (its decoder layers are {type(model.backbone.get_submodule(model.arch.block_path(0))).__name__})")
    else:
        blocks = [model.backbone.get_submodule(model.arch.block_path(i)) for i in range(model.arch.num_layers)]
    return [*blocks, model]


def shard(model, settings: FSDPSettings, device: torch.device) -> dict[int, torch.nn.Module]:
    """``fully_shard`` ``model`` (an ``AlignModel``) over every process, in place. Returns the map
    from each (sharded) parameter's id to the module whose group owns it (``unsharded``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # None (torch's "auto") rather than True: layers reshard after their forward, the root does not
    # (the backward would gather it again at once), and sampling with everything gathered is then
    # free of collectives; an explicit True would regather the root at every decoding step
    kwargs = {"mesh": mesh, "reshard_after_forward": None if settings.reshard_after_forward else False,
              "offload_policy": CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()}
    owner: dict[int, torch.nn.Module] = {}
    for module in shard_groups(model, settings):
        fully_shard(module, **kwargs)
        module._align_reshard_after_forward = settings.reshard_after_forward and module is not model
        for p in module.parameters():
            owner.setdefault(id(p), module)
    return owner


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a sharded parameter (a collective: every process must call), ``t``
    itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


@contextlib.contextmanager
def unsharded(modules, keep_across_forwards: bool = False):
    """Gather the groups of ``modules`` whole inside the context: their parameters, read from the
    modules (``module.weight``), are plain full tensors. With ``keep_across_forwards`` forwards
    inside the context do not reshard them again (sampling: one gather for the whole loop)."""
    modules = list(dict.fromkeys(modules))
    toggled = [m for m in modules if keep_across_forwards and getattr(m, "_align_reshard_after_forward", False)]
    for m in toggled:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        for m in modules:
            m.unshard()
        yield
    finally:
        for m in modules:
            m.reshard()
        for m in toggled:
            m.set_reshard_after_forward(True, recurse=False)
