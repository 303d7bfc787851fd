"""Keep the Mamba mixers' SSM parameters in fp32 under FSDP2 mixed precision.

FSDP2's `MixedPrecisionPolicy` is per shard unit: every parameter the unit all-gathers reaches forward in
`param_dtype`. With accelerate's FSDP2 and `mixed_precision: bf16` each decoder layer is one unit with
`param_dtype=bf16`, so the mixers' A_log, D and dt_bias (Mamba-1: dt_proj.bias), which the model keeps in
fp32 (`_keep_in_fp32_modules_strict`), are rounded to bf16 before the mixer's `.float()` can help.

`fp32_mamba_mixers(accelerator)` is a context manager for `accelerator.prepare`: while it is open, each
`fully_shard` call that accelerate makes on a module with a low-precision policy first shards the Mamba
mixers inside that module as units of their own, with the same mesh, resharding and offload settings and
`param_dtype=reduce_dtype=fp32`; inside each mixer, its projections (in_proj, out_proj; Mamba-1's x_proj)
become units with the outer bf16 policy. The decoder layer's unit keeps the rest of the layer (norms, MLP)
in bf16. accelerate's FSDP2 path applies no autocast (the parameter dtype is the compute dtype), so the
projections still run in bf16 while the conv, the scan, the gated norm and the SSM parameters run in fp32,
and those parameters' gradients are reduced in fp32. It acts where accelerate shards (after its fp32 upcast
and, with `cpu_ram_efficient_loading`, on the meta device, before rank 0's weights are broadcast), so it
works with the FSDP2 options accelerate applies. Parameter names, and so checkpoints, are unchanged.
Outside FSDP2, or without a low-precision policy, it does nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..modeling.modeling_hybrid_mamba import HybridMamba1Mixer, HybridMamba2Mixer

MAMBA_MIXERS = (HybridMamba1Mixer, HybridMamba2Mixer)


# The mixers' large matmuls, all called through their module (so FSDP2's hooks fire): units of their own
# that keep the outer (bf16) parameters. conv1d's weight is read directly, so it stays in the mixer's unit.
PROJECTIONS = ("in_proj", "x_proj", "out_proj")


def fp32_mixer_policy(policy):
    """The policy for a mixer unit: fp32 parameters and gradient reduction; the outer unit's output dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=torch.float32,
        reduce_dtype=torch.float32,
        output_dtype=policy.output_dtype,
        cast_forward_inputs=policy.cast_forward_inputs,
    )


def projection_policy(policy, name: str):
    """A projection inside an fp32 mixer: the outer policy's parameters and reduction, inputs cast to them;
    the outputs that feed the mixer's fp32 parts (in_proj, x_proj) come back in fp32, out_proj's in the
    outer output dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        output_dtype=policy.output_dtype if name == "out_proj" else torch.float32,
        cast_forward_inputs=True,
    )


def _needs_fp32_units(policy) -> bool:
    return policy is not None and policy.param_dtype not in (None, torch.float32)


def shard_mamba_mixers(
    module: nn.Module | list[nn.Module], fully_shard=None, bf16_projections: bool = True, **fsdp_kwargs
) -> list[nn.Module]:
    """`fully_shard` each Mamba mixer inside `module` (not yet sharded) with `fp32_mixer_policy`; the mixers.

    `fsdp_kwargs` are those of the enclosing unit (mesh, reshard_after_forward, offload_policy, mp_policy);
    call this before sharding the enclosing unit, so that its parameters stay out of it. Under an fp32
    policy the mixer computes in fp32 (accelerate's FSDP2 path has no autocast: the parameter dtype is the
    compute dtype). With `bf16_projections` (the default) its projections (in_proj, out_proj; Mamba-1's
    x_proj), most of a Mamba layer's FLOPs, are units of their own in the outer policy, so they still run in
    bf16 and only the conv, the scan, the gated norm and the SSM parameters are fp32 (three more, smaller
    all-gathers per Mamba layer). Without, the whole mixer runs in fp32.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    if fully_shard is None:
        from torch.distributed.fsdp import fully_shard
    policy = fsdp_kwargs.get("mp_policy") or MixedPrecisionPolicy()
    if not _needs_fp32_units(policy):
        return []
    mixers = []
    for root in module if isinstance(module, list) else [module]:
        mixers += [m for m in root.modules() if isinstance(m, MAMBA_MIXERS) and not isinstance(m, FSDPModule)]
    for mixer in mixers:
        for name in PROJECTIONS if bf16_projections else ():
            proj = getattr(mixer, name, None)
            if proj is not None and not isinstance(proj, FSDPModule):
                fully_shard(proj, **{**fsdp_kwargs, "mp_policy": projection_policy(policy, name)})
        fully_shard(mixer, **{**fsdp_kwargs, "mp_policy": fp32_mixer_policy(policy)})
    return mixers


@contextlib.contextmanager
def fp32_mamba_mixers(accelerator, bf16_projections: bool = True):
    """Around `accelerator.prepare(model, ...)`: Mamba mixers become FSDP2 units with fp32 parameters
    (their projections bf16 units inside them unless `bf16_projections=False`; see `shard_mamba_mixers`).

    accelerate's `fsdp2_prepare_model` takes `fully_shard` from `torch.distributed.fsdp` when it runs;
    inside this block that name is a wrapper that shards the mixers of each unit first (see the module
    docstring). Not FSDP2, or no low-precision policy: a no-op.
    """
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if (
        accelerator.distributed_type != DistributedType.FSDP
        or plugin is None
        or plugin.fsdp_version != 2
        or not _needs_fp32_units(plugin.mixed_precision_policy)
    ):
        yield
        return
    import torch.distributed.fsdp as fsdp

    original = fsdp.fully_shard

    @functools.wraps(original)
    def fully_shard(module, **kwargs):
        shard_mamba_mixers(module, fully_shard=original, bf16_projections=bf16_projections, **kwargs)
        return original(module, **kwargs)

    fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        fsdp.fully_shard = original
