"""Where LoRA goes in a hybrid_mamba model: the one place the default target map is written down.

The map is read off the model's own modules, not a list kept by hand: every `nn.Linear` inside a
decoder layer, named by its last two path components (`self_attn.q_proj`, `mlp.up_proj`,
`mamba.in_proj`, ...). `x_proj` and `dt_proj` exist only in Mamba-1 layers, the attention
projections only where the layout has attention layers, the MLP only when `intermediate_size > 0`.

    targets = resolve_targets(model, ["attention", "mamba.out_proj", "up_proj"])
    LoraConfig(target_modules=targets, ...)

A name is a group (`all`, `attention`, `mlp`, `mamba`), a qualified name (`mamba.in_proj`) or a bare
one (`in_proj`); anything else is an error that lists what the model has.
"""

import torch
from torch import nn

# Group of each parent module name; "all" is every target the model has.
GROUPS = {"self_attn": "attention", "mlp": "mlp", "mamba": "mamba"}


def available_targets(model: nn.Module) -> list[str]:
    """Qualified names (`parent.child`) of the linear layers inside the decoder layers, sorted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = set()
    for name, module in base.named_modules():
        parts = name.split(".")
        # model.layers.<i>.<parent>.<child>
        if _is_linear(module) and len(parts) >= 3 and parts[-3].isdigit() and parts[-2] in GROUPS:
            found.add(".".join(parts[-2:]))
    if not found:
        raise ValueError(f"{type(base).__name__} has no linear layers inside model.layers.<i>.{{{', '.join(GROUPS)}}}.")
    return sorted(found)


def default_targets(model: nn.Module) -> list[str]:
    """The default LoRA targets: attention q/k/v/o, MLP gate/up/down, Mamba in/out (and x/dt for v1)."""
    return available_targets(model)


def resolve_targets(model: nn.Module, names: list[str] | None) -> list[str]:
    """Qualified target names for `LoraConfig.target_modules`; `None` or `[]` gives the default map."""
    available = available_targets(model)
    if not names:
        return default_targets(model)
    chosen, unknown = [], []
    for name in names:
        if name == "all":
            hits = available
        elif name in GROUPS.values():
            hits = [t for t in available if GROUPS[t.split(".")[0]] == name]
        elif "." in name:
            hits = [name] if name in available else []
        else:
            hits = [t for t in available if t.split(".")[1] == name]
        if not hits:
            unknown.append(name)
        chosen += [t for t in hits if t not in chosen]
    if unknown:
        groups = sorted({"all", *(GROUPS[t.split(".")[0]] for t in available)})
        raise ValueError(
            f"Unknown LoRA target(s) {unknown} for this model (layers {sorted(set(model.config.layer_types))}). "
            f"Available targets: {', '.join(available)}; groups: {', '.join(groups)}."
        )
    return sorted(chosen)


def target_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names (`model.layers.3.mamba.in_proj`) that `targets` select, in model order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [
        name
        for name, module in base.named_modules()
        if _is_linear(module) and any(name.endswith("." + t) for t in targets) and ".layers." in name
    ]


def _is_linear(module: nn.Module) -> bool:
    # a peft LoRA layer wraps the linear as `base_layer` and takes its name; bnb's Linear4bit is an nn.Linear
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def lora_parameter_count(module: nn.Linear, rank: int) -> int:
    """Trainable parameters of a rank-`rank` LoRA on `module`: A (r x in) + B (out x r)."""
    out_features, in_features = _shape(module)
    return rank * (in_features + out_features)


def _shape(module: nn.Module) -> tuple[int, int]:
    # a bitsandbytes 4-bit weight is stored packed; its logical shape is on the module
    if hasattr(module, "out_features"):
        return module.out_features, module.in_features
    w: torch.Tensor = module.weight
    return tuple(w.shape)
