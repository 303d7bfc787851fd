"""Structured pruning with learned masks: Mamba-2 heads, Mamba-1 inner channels, MLP channels.

    masks = attach_masks(model, target_sparsity=0.3)    # masks live in model.prune_masks (trained with it)
    loss = model(**batch).loss + masks.penalty()        # what trainers/prune.py hands the training loop
    plan = masks.finalize()                             # which units stay, and the value each is scaled by
    small = remove_units(model, plan)                   # a model with a smaller config, same function

The criterion is learned, not a magnitude schedule: one hard-concrete gate per unit (Louizos, Welling
and Kingma 2018, "Learning sparse neural networks through L0 regularization"), trained jointly with
the language-model loss, and a Lagrangian term on the expected sparsity (CoFi, Xia et al. 2022;
Sheared-LLaMA, Xia et al. 2024). Why this rather than a magnitude criterion: the units removed here
are whole heads and channels whose importance is not in the size of any one weight (a Mamba-2 head's
effect goes through its decay A, its timestep and a normalisation shared with other heads), whereas a
gate measures the loss directly; the Lagrangian term reaches a given parameter budget without tuning a
penalty coefficient, and the weights adapt to the units being taken away while the gates learn.

Units and what they own (everything else, e.g. Mamba-2's B/C projections, is shared and stays):
- Mamba-2 head h: its rows of `in_proj` for z, x and dt, its x channels of `conv1d`, `A_log[h]`,
  `D[h]`, `dt_bias[h]`, its slice of `norm.weight` and its columns of `out_proj`. Heads are kept in
  equal numbers in every B/C group (the SSD layout needs `heads % n_groups == 0`, and a group's heads
  share its B and C), at least one per group.
- Mamba-1 inner channel e: its rows of `in_proj` (x and z halves), `conv1d` channel, `x_proj` column,
  `dt_proj` row and bias, `A_log[e]`, `D[e]`, `out_proj` column; at least one per layer.
- MLP channel i: rows of `gate_proj` and `up_proj`, column of `down_proj`; a layer may lose all of
  them (its MLP is then removed).

Where a gate acts, so that removal is exact. MLP and Mamba-1 gates scale the input of the output
projection (`down_proj`, `out_proj`), which is linear: a gate value folds into that projection's
columns. Mamba-1's `x_proj` reads every channel (dt, B and C are shared by the channels): a removed
channel is also zeroed on its way into `x_proj`. A Mamba-2 gate scales the head's output after the
gated RMSNorm, and the norm's statistic of each group is taken over the heads present only (gate > 0
when sampled; kept by the plan in eval mode): that is what the smaller model computes, its group
holding only the kept heads. It is done with the model's own norm operator: the present channels are
scaled by sqrt(n / k) on the way in (group of n channels, k present) and by gate / sqrt(n / k) on the
way out.

Sparsity is the fraction of non-embedding parameters removed; the expected remaining count is linear
in the gates' probabilities of being non-zero (`PruneMasks.expected_sparsity`). `finalize()` makes the
masks deterministic at exactly the target: units are dropped in increasing order of log-alpha across
all layers until the target is met (the gates decide where, the target how much; CoFi instead keeps
round(expected non-zero gates) per layer, which misses the target when training has not converged on
it, as in a run of a few hundred steps), each kept unit scaled by its test-time gate value. The
masked model in eval mode uses these deterministic masks, so the training loop's validation loss is
the pruned model's.
"""

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

# Hard-concrete stretch interval and temperature (Louizos et al. 2018).
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
MASKS_ATTR = "prune_masks"


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient: AdamW then ascends on the Lagrange multipliers."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@dataclass
class MaskGroup:
    """The gates of one kind of unit in one layer: `size` units of `params_per_unit` parameters each."""

    layer_idx: int
    kind: str  # "mamba2_heads", "mamba1_channels" or "mlp_channels"
    size: int
    params_per_unit: int
    channels_per_unit: int  # width of one unit in the tensor the gate scales (head_dim for heads)
    groups: int = 1  # Mamba-2: the same number of units is kept in each of these contiguous groups
    min_per_group: int = 0

    @property
    def name(self) -> str:
        return f"layer{self.layer_idx}_{self.kind}"


@dataclass
class PrunePlan:
    """What `finalize` decided: per mask group, the units kept (sorted) and the value each is scaled by."""

    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (k,) long
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (k,) float


def mask_groups(model, kinds=("mamba2_heads", "mamba1_channels", "mlp_channels")) -> list[MaskGroup]:
    """The prunable units of `model` (a HybridMambaForCausalLM), counted from its modules."""
    groups = []
    for i, layer in enumerate(model.model.layers):
        if layer.mixer_type == "mamba2" and "mamba2_heads" in kinds:
            m = layer.mamba
            d, p, k = m.hidden_size, m.head_dim, m.conv_kernel_size
            per = d * (2 * p + 1) + d * p + p * k + 3 + p  # in_proj z/x/dt rows, out_proj cols, conv, A/D/dt_bias, norm
            per += (2 * p + 1) * (m.in_proj.bias is not None) + p * (m.conv1d.bias is not None)
            groups.append(MaskGroup(i, "mamba2_heads", m.num_heads, per, p, groups=m.n_groups, min_per_group=1))
        if layer.mixer_type == "mamba1" and "mamba1_channels" in kinds:
            m = layer.mamba
            d, k, n, r = m.hidden_size, m.conv_kernel_size, m.d_state, m.dt_rank
            per = 2 * d + k + (r + 2 * n) + (r + 1) + n + 1 + d
            per += 2 * (m.in_proj.bias is not None) + (m.conv1d.bias is not None)
            groups.append(MaskGroup(i, "mamba1_channels", m.d_inner, per, 1, min_per_group=1))
        if layer.mlp is not None and "mlp_channels" in kinds:
            mlp = layer.mlp
            per = 3 * mlp.gate_proj.in_features + 2 * (mlp.gate_proj.bias is not None)
            groups.append(MaskGroup(i, "mlp_channels", mlp.gate_proj.out_features, per, 1))
    return groups


def non_embedding_parameters(model) -> int:
    emb = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    return sum(p.numel() for n, p in model.named_parameters() if id(p) not in emb and MASKS_ATTR not in n)


class PruneMasks(nn.Module):
    """Hard-concrete gates over the units of `groups`, and the Lagrangian term toward a target sparsity.

    `log_alpha = lr_scale * theta`: AdamW moves a parameter by about the learning rate per step whatever
    its gradient's scale, so the gates learn `lr_scale` times faster than the weights through the one
    optimizer of the training loop; the multipliers likewise with `lambda_lr_scale` (default: lr_scale).
    The target rises linearly from 0 over `warmup_steps` optimizer steps (the `calls` buffer counts
    micro-batches, and is saved with the model's state, so a resumed run continues the ramp).
    """

    def __init__(
        self,
        groups: list[MaskGroup],
        total_params: int,
        target_sparsity: float,
        warmup_steps: int = 0,
        micro_batches_per_step: int = 1,
        init_keep_prob: float = 0.9,
        lr_scale: float = 30.0,
        lambda_lr_scale: float | None = None,
    ):
        super().__init__()
        prunable = sum(g.size * g.params_per_unit for g in groups)
        floor = sum(g.groups * g.min_per_group * g.params_per_unit for g in groups)
        reachable = (prunable - floor) / total_params
        if not 0.0 <= target_sparsity < reachable:
            raise ValueError(
                f"target sparsity {target_sparsity} is outside [0, {reachable:.3f}): the prunable units (Mamba "
                "heads and channels, MLP channels) hold that fraction of the non-embedding parameters; choose a "
                "smaller one."
            )
        self.groups = groups
        self.total_params = total_params
        self.target_sparsity = target_sparsity
        self.warmup_steps = warmup_steps
        self.micro_batches_per_step = micro_batches_per_step
        self.lr_scale = lr_scale
        self.lambda_lr_scale = lr_scale if lambda_lr_scale is None else lambda_lr_scale
        init = math.log(init_keep_prob) - math.log(1 - init_keep_prob)
        self.theta = nn.ParameterDict({g.name: nn.Parameter(torch.full((g.size,), init / lr_scale)) for g in groups})
        # the multipliers, stored divided by lambda_lr_scale
        self.lambda_params = nn.Parameter(torch.zeros(2))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.plan: PrunePlan | None = None  # when set, forward uses it instead of sampling or finalizing
        self._z: dict[str, torch.Tensor] = {}

    @property
    def lambdas(self) -> torch.Tensor:
        return self.lambda_params * self.lambda_lr_scale

    def log_alpha(self, name: str) -> torch.Tensor:
        return self.theta[name] * self.lr_scale

    def prob_nonzero(self, name: str) -> torch.Tensor:
        """P(gate > 0) of each unit: 1 - Q(s <= 0) of the stretched hard concrete."""
        return torch.sigmoid(self.log_alpha(name) - BETA * math.log(-GAMMA / ZETA))

    def expected_sparsity(self) -> torch.Tensor:
        removed = sum((g.size - self.prob_nonzero(g.name).sum()) * g.params_per_unit for g in self.groups)
        return removed / self.total_params

    def current_target(self) -> float:
        steps = int(self.calls) // max(1, self.micro_batches_per_step)
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, steps / self.warmup_steps)
        return self.target_sparsity * ramp

    def penalty(self) -> torch.Tensor:
        """lambda_1 (s - t) + lambda_2 (s - t)^2, minimised by the gates and maximised by the lambdas."""
        gap = self.expected_sparsity() - self.current_target()
        if self.training:
            self.calls += 1
        l1, l2 = _ReverseGrad.apply(self.lambdas)
        return l1 * gap + l2 * gap * gap

    def sample(self) -> None:
        """Draw every gate once for this forward (training) or set the deterministic ones (eval)."""
        if self.training and self.plan is None:
            z = {}
            for g in self.groups:
                la = self.log_alpha(g.name)
                u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
                z[g.name] = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
            self._z = z
            self._open = {name: (v > 0).to(v.dtype) for name, v in z.items()}
        else:
            plan = self.plan if self.plan is not None else self.finalize()
            self._z, self._open = {}, {}
            for g in self.groups:
                device = self.theta[g.name].device
                full, open_ = torch.zeros(g.size, device=device), torch.zeros(g.size, device=device)
                full[plan.keep[g.name]] = plan.values[g.name].to(device)
                open_[plan.keep[g.name]] = 1.0  # kept, even where its value is 0: the smaller model has it
                self._z[g.name], self._open[g.name] = full, open_

    def gate(self, name: str) -> torch.Tensor:
        return self._z[name]

    def is_open(self, name: str) -> torch.Tensor:
        """1 for the units present in this forward (gate > 0 when sampling, kept by the plan otherwise)."""
        return self._open[name]

    @torch.no_grad()
    def finalize(self) -> PrunePlan:
        """Deterministic masks at exactly the target sparsity (to one unit): units are dropped in order of
        log-alpha across all layers until the target is met, so the gates decide where the parameters go
        and the target decides how many. A Mamba-2 layer drops one head from every group at a time (its
        slot j scores the smallest j-th largest log-alpha of the groups); every layer keeps its minimum.
        Each kept unit is scaled by its test-time gate value clamp(sigmoid(log_alpha) (zeta - gamma) + gamma).
        """
        ranked = {}  # name -> (G, per_group) indices of each group, by decreasing log-alpha
        items = []  # (score, name, slot): drop candidates; slot j of a layer goes before slot j - 1
        for g in self.groups:
            la = self.log_alpha(g.name).detach().float().cpu().view(g.groups, -1)
            order = la.argsort(dim=-1, descending=True, stable=True)  # (G, per_group)
            ranked[g.name] = order
            slot_scores = la.gather(-1, order).min(dim=0).values  # (per_group,), non-increasing
            for j in range(g.min_per_group, order.shape[-1]):
                items.append((float(slot_scores[j]), g.name, j))
        items.sort(key=lambda t: (t[0], -t[2]))
        params = {g.name: g.groups * g.params_per_unit for g in self.groups}
        kept_slots = {g.name: g.size // g.groups for g in self.groups}
        removed, budget = 0, self.target_sparsity * self.total_params
        for _, name, _ in items:
            if removed >= budget:
                break
            kept_slots[name] -= 1
            removed += params[name]
        plan = PrunePlan()
        for g in self.groups:
            la = self.log_alpha(g.name).detach().float()
            value = (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
            per_group = g.size // g.groups
            order = ranked[g.name][:, : kept_slots[g.name]] + torch.arange(g.groups)[:, None] * per_group
            idx = order.flatten().sort().values.to(la.device)
            plan.keep[g.name], plan.values[g.name] = idx, value[idx]
        return plan

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Expected sparsity, the current target and the Lagrange multipliers, as floats."""
        return {
            "expected_sparsity": float(self.expected_sparsity()),
            "target": self.current_target(),
            "lambda_1": float(self.lambdas[0]),
            "lambda_2": float(self.lambdas[1]),
        }

    def sparsity_of(self, plan: PrunePlan) -> float:
        removed = sum((g.size - plan.keep[g.name].numel()) * g.params_per_unit for g in self.groups)
        return removed / self.total_params

    def extra_repr(self) -> str:
        return f"{len(self.groups)} groups, target sparsity {self.target_sparsity}"


# Applying the gates: hooks on the model's own modules


def _per_channel(z: torch.Tensor, channels: int) -> torch.Tensor:
    return z.repeat_interleave(channels) if channels > 1 else z


def _hooks_for(layer, group: MaskGroup, masks: PruneMasks) -> list:
    name = group.name
    if group.kind == "mlp_channels":

        def scale_down_input(module, args):
            return (args[0] * masks.gate(name).to(args[0].dtype),)

        return [layer.mlp.down_proj.register_forward_pre_hook(scale_down_input)]
    if group.kind == "mamba1_channels":

        def scale_out_input(module, args):
            return (args[0] * masks.gate(name).to(args[0].dtype),)

        def drop_from_x_proj(module, args):
            # dt, B and C are read from every channel: a removed channel must not feed them
            return (args[0] * masks.is_open(name).to(args[0].dtype),)

        mixer = layer.mamba
        return [
            mixer.out_proj.register_forward_pre_hook(scale_out_input),
            mixer.x_proj.register_forward_pre_hook(drop_from_x_proj),
        ]

    # Mamba-2 heads: the gated norm's statistic over the kept heads of each group (see the module docstring)
    mixer = layer.mamba
    p, groups = mixer.head_dim, mixer.n_groups

    def _scales(dtype):
        z = masks.gate(name)
        open_ = masks.is_open(name).view(groups, -1)  # (G, H/G)
        kept = open_.sum(-1, keepdim=True).clamp(min=1)
        c = torch.sqrt(open_.shape[-1] / kept)  # (G, 1)
        inp = _per_channel((open_ * c).flatten(), p).to(dtype)
        out = _per_channel((z.view(groups, -1) / c).flatten(), p).to(dtype)
        return inp, out

    def norm_in(module, args):
        y, gate = args
        return (y * _scales(y.dtype)[0], gate)

    def norm_out(module, args, output):
        return output * _scales(output.dtype)[1]

    return [mixer.norm.register_forward_pre_hook(norm_in), mixer.norm.register_forward_hook(norm_out)]


def attach_masks(
    model,
    target_sparsity: float,
    kinds=("mamba2_heads", "mamba1_channels", "mlp_channels"),
    warmup_steps: int = 0,
    micro_batches_per_step: int = 1,
    init_keep_prob: float = 0.9,
    lr_scale: float = 30.0,
    lambda_lr_scale: float | None = None,
) -> PruneMasks:
    """Add a `PruneMasks` to `model` (as `model.prune_masks`, so the training loop's optimizer sees its
    parameters) and the hooks that apply it; returns it. `detach_masks` undoes both."""
    if hasattr(model, MASKS_ATTR):
        raise ValueError("the model has masks already: call detach_masks(model) first.")
    groups = mask_groups(model, kinds)
    if not groups:
        raise ValueError(f"the model has no prunable units of kinds {list(kinds)}.")
    masks = PruneMasks(
        groups,
        non_embedding_parameters(model),
        target_sparsity,
        warmup_steps=warmup_steps,
        micro_batches_per_step=micro_batches_per_step,
        init_keep_prob=init_keep_prob,
        lr_scale=lr_scale,
        lambda_lr_scale=lambda_lr_scale,
    ).to(next(model.parameters()).device)
    masks.train(model.training)
    setattr(model, MASKS_ATTR, masks)
    handles = [model.model.register_forward_pre_hook(lambda module, args: masks.sample())]
    for g in groups:
        handles += _hooks_for(model.model.layers[g.layer_idx], g, masks)
    masks._handles = handles
    return masks


def detach_masks(model) -> PruneMasks:
    masks = getattr(model, MASKS_ATTR)
    for h in masks._handles:
        h.remove()
    delattr(model, MASKS_ATTR)
    return masks


# Removal


def _mamba2_slices(mixer, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Indices, per parameter of a Mamba-2 mixer, of what the kept heads own (plus the shared B/C parts)."""
    p, e, gn = mixer.head_dim, mixer.d_inner, mixer.n_groups * mixer.d_state
    ch = (keep[:, None] * p + torch.arange(p)).flatten()  # kept channels of d_inner
    bc = torch.arange(2 * gn)
    # in_proj rows: [z (E) | x (E) | B (G N) | C (G N) | dt (H)]; conv channels: [x (E) | B | C]
    return {
        "in_proj": torch.cat([ch, e + ch, 2 * e + bc, 2 * e + 2 * gn + keep]),
        "conv1d": torch.cat([ch, e + bc]),
        "heads": keep,
        "channels": ch,
    }


def _pruned_state(model, plan: PrunePlan, groups: list[MaskGroup]) -> dict[str, torch.Tensor]:
    """`model`'s state dict with the dropped units' slices removed and the gate values folded into the
    output projections' columns."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(MASKS_ATTR + ".")}
    for g in groups:
        keep, values = plan.keep[g.name].cpu(), plan.values[g.name]
        layer = model.model.layers[g.layer_idx]
        pre = f"model.layers.{g.layer_idx}."

        def take(key, idx, dim=0, scale=None):
            if key not in state:
                return
            t = state[key].index_select(dim, idx.to(state[key].device))
            if scale is not None:
                t = t * scale.to(t.device, t.dtype)
            state[key] = t

        if g.kind == "mlp_channels":
            if keep.numel() == 0:  # the layer loses its MLP
                for k in [k for k in state if k.startswith(pre + "mlp.") or k.startswith(pre + "pre_mlp_layernorm.")]:
                    del state[k]
                continue
            for name in ("gate_proj", "up_proj"):
                take(f"{pre}mlp.{name}.weight", keep)
                take(f"{pre}mlp.{name}.bias", keep)
            take(f"{pre}mlp.down_proj.weight", keep, dim=1, scale=values)
        elif g.kind == "mamba2_heads":
            sl = _mamba2_slices(layer.mamba, keep)
            m = pre + "mamba."
            take(m + "in_proj.weight", sl["in_proj"])
            take(m + "in_proj.bias", sl["in_proj"])
            take(m + "conv1d.weight", sl["conv1d"])
            take(m + "conv1d.bias", sl["conv1d"])
            for name in ("dt_bias", "A_log", "D"):
                take(m + name, sl["heads"])
            take(m + "norm.weight", sl["channels"])
            take(m + "out_proj.weight", sl["channels"], dim=1, scale=_per_channel(values, layer.mamba.head_dim))
        elif g.kind == "mamba1_channels":
            m, e = pre + "mamba.", layer.mamba.d_inner
            take(m + "in_proj.weight", torch.cat([keep, e + keep]))
            take(m + "in_proj.bias", torch.cat([keep, e + keep]))
            for name in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
                take(m + name, keep)
            take(m + "x_proj.weight", keep, dim=1)
            take(m + "out_proj.weight", keep, dim=1, scale=values)
    return state


def pruned_config(model, plan: PrunePlan, groups: list[MaskGroup]):
    """The config of the smaller model: per-layer MLP and Mamba widths from `plan`."""
    cfg = model.config
    n = cfg.num_hidden_layers
    inter = [cfg.layer_intermediate_size(i) for i in range(n)]
    d_inner = [0 if cfg.mixer_type(i) == "attention" else cfg.layer_mamba_d_inner(i) for i in range(n)]
    for g in groups:
        k = int(plan.keep[g.name].numel())
        if g.kind == "mlp_channels":
            inter[g.layer_idx] = k
        else:
            d_inner[g.layer_idx] = k * g.channels_per_unit
    d = cfg.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        d.pop(key, None)
    d["intermediate_size_per_layer"] = inter
    d["mamba_d_inner_per_layer"] = d_inner if any(cfg.mixer_type(i) != "attention" for i in range(n)) else None
    return type(cfg)(**d)


@torch.no_grad()
def remove_units(model, plan: PrunePlan, groups: list[MaskGroup] | None = None):
    """A new model of the same class with the units `plan` drops removed and its gate values folded into
    the output projections: the same function as `model` with the gates of `plan` applied."""
    if groups is None and hasattr(model, MASKS_ATTR):
        groups = getattr(model, MASKS_ATTR).groups
    if groups is None:
        raise ValueError("give the mask groups, or a model with masks attached (attach_masks).")
    config = pruned_config(model, plan, groups)
    param = next(model.parameters())
    small = type(model)(config).to(device=param.device)
    small.load_state_dict(_pruned_state(model, plan, groups), strict=True)
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def prune_model(model, masks: PruneMasks | None = None):
    """Finalize `model`'s masks, detach them and return (smaller model, plan, sparsity reached)."""
    masks = masks or getattr(model, MASKS_ATTR)
    plan = masks.finalize()
    small = remove_units(model, plan, masks.groups)
    return small, plan, masks.sparsity_of(plan)


__all__ = [
    "PruneMasks",
    "PrunePlan",
    "MaskGroup",
    "attach_masks",
    "detach_masks",
    "mask_groups",
    "remove_units",
    "pruned_config",
    "prune_model",
    "non_embedding_parameters",
]
