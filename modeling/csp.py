"""CSP: a correlation-based permutation of Mamba heads, channels and state dimensions (and MLP channels)
that leaves the model's function unchanged.

    python -m hybrid_mamba.modeling.csp --model DIR --out DIR [--calibration_tokens N] [--seed S] [--no_mlp]

    perms = csp_permute(model, calibration_ids)      # chooses and applies, in place
    apply_permutations(other_model, perms)            # the same permutations on another copy

What is permuted, and why each is exact (up to the rounding of a reordered sum):

- Mamba-2 heads, within each group (`mamba2_heads`). A head h is a block of `mamba_head_dim`
  channels of x and of z (rows of `in_proj`, channels of `conv1d`, weights of the gated norm, columns
  of `out_proj`), one dt row of `in_proj`, and `A_log[h]`, `D[h]`, `dt_bias[h]`. Heads do not interact
  inside the scan; they share only their group's B and C. Head h belongs to group h // (H / G) (the
  scan and mamba-ssm's kernels both use this layout), and the gated RMSNorm normalises per group of
  d_inner / G channels, a statistic invariant under a reordering inside the group but not across
  groups: so a head permutation must map each group onto itself. The norm's weight is elementwise and
  moves with its channels.
- Mamba-2 state dimensions, per group (`mamba2_state`). The state of a head is (P, N): B_n writes
  dimension n and C_n reads it, A is a scalar per head. Permuting the N rows of B and of C of a group
  (their `in_proj` rows and `conv1d` channels) with the same permutation is exact; B and C must move
  together, and each group may take its own permutation.
- Mamba-1 inner channels (`mamba1_channels`). A channel e is a row of x and of z in `in_proj`, a
  `conv1d` channel, a column of `x_proj`, a row of `dt_proj` (weight and bias), a row of `A_log`, `D[e]`
  and a column of `out_proj`; channels interact only through `x_proj`'s sum over them (order-free).
- Mamba-1 state dimensions (`mamba1_state`): the rows of B and of C in `x_proj` and the columns of
  `A_log`, all with the same permutation.
- MLP channels (`mlp`): rows of `gate_proj` and `up_proj` (and their biases), columns of `down_proj`.

A cache made by the original model is not valid for the permuted one (its states are in the old
order); generation from scratch, with a fresh cache, gives the same tokens.

How the permutation is chosen ("correlation-based"): the model runs on calibration token ids, and
for every permutable set the per-token activation of each unit is collected: a Mamba-2 head's RMS over
its channels of the gated-norm output (the input of `out_proj`), a Mamba-1 channel's and an MLP
channel's signed input of the output projection, and a state dimension's B and C after the
convolution (the correlation matrices of B and of C averaged). On the absolute correlation matrix the
units are ordered by greedy nearest-neighbour seriation: start at one unit (every one in turn for sets
of fewer than 64 units, else the one with the largest total absolute correlation), then repeatedly
append the unused unit most correlated with the last one; the best path is kept, or the identity when
no path beats it (a greedy path can end on badly matched leftovers). This
maximises adjacent correlation directly and separates several clusters of correlated units into runs;
ordering by the leading eigenvector would only sort by the loading on one dominant factor, which puts
units with small loadings (most of them, when there are several clusters) in an order that is noise.
The score reported per set is the mean absolute correlation of neighbours, before (identity) and after.

Does it change speed? Not here, and not in any dense implementation: a permutation of heads, channels
or state dimensions changes which row of a weight matrix holds which unit, not the shapes, the
number of multiply-adds or the memory layout that the pure-torch operators (or mamba-ssm's dense
kernels) read; every head and every state dimension is computed, whatever its order. On CPU the
permuted model runs the same matmuls, scans and norms on tensors of the same shapes: the aten op
trace of a prefill and a decode step, with every argument's shape, stride and dtype, is identical
(eval_harness/bench_csp.py checks it and times both models against an unpermuted copy as a control;
docs/results/bench_csp: on a loaded 2-core machine the CSP/original ratios, 0.84-1.03 of medians, lie
within the spread of the copy/original ratios, 0.85-1.14, i.e. noise; no 24% saving). An ordering can only matter for
kernels that treat neighbouring units differently from distant ones: block-sparse or pruned state and
heads (skipping a block of state dimensions or heads whose activations are jointly small, which
needs correlated units in the same block), quantisation with per-block scales (correlated units of
similar range in one block lose less), or cache-line / tile grouping that lets a kernel fetch only the
active tiles of a state. None of these exists in this repository, so any latency change from CSP alone
would be noise.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir, write_json_atomic
from hybrid_mamba.configuration.configuration_hybrid_mamba import HybridMambaConfig
from hybrid_mamba.modeling.modeling_hybrid_mamba import (
    HybridMamba1Mixer,
    HybridMamba2Mixer,
    HybridMambaForCausalLM,
    HybridMambaMLP,
)

logger = logging.getLogger(__name__)

KINDS = ("mamba2_heads", "mamba2_state", "mamba1_channels", "mamba1_state", "mlp")


# applying permutations


def _block_index(size: int, start: int, perm: torch.Tensor) -> torch.Tensor:
    """Index of `size` entries, identity except entries start .. start + len(perm) - 1, reordered by `perm`."""
    idx = torch.arange(size, device=perm.device)
    idx[start : start + perm.numel()] = start + perm
    return idx


@torch.no_grad()
def _take(param: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    """param <- param.index_select(dim, index), in place (the Parameter object is kept)."""
    if param is not None:
        param.copy_(param.index_select(dim, index.to(param.device)))


def _channels_of_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channel permutation of a head permutation: each head moves as a block of `head_dim` channels."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def check_permutation(perm: torch.Tensor, n: int, what: str) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).reshape(-1).cpu()
    if perm.numel() != n or not torch.equal(perm.sort().values, torch.arange(n)):
        raise ValueError(f"{what}: expected a permutation of {n} entries, got {perm.tolist()}")
    return perm


def permute_mamba2_heads(mixer: HybridMamba2Mixer, perm) -> None:
    """New head i is old head perm[i]; every head stays in its group (else ValueError)."""
    h, p, g = mixer.num_heads, mixer.head_dim, mixer.n_groups
    perm = check_permutation(perm, h, "Mamba-2 heads")
    hg = h // g
    if not torch.equal(perm // hg, torch.arange(h) // hg):
        raise ValueError(
            f"Mamba-2 heads: {perm.tolist()} moves a head out of its group ({g} groups of {hg} heads); "
            "the gated RMSNorm normalises per group, so that would change the function."
        )
    e, conv_dim = mixer.d_inner, mixer.conv_dim
    ch = _channels_of_heads(perm, p)
    rows = torch.arange(e + conv_dim + h)
    rows[:e] = ch  # z
    rows[e : 2 * e] = e + ch  # x
    rows[e + conv_dim :] = e + conv_dim + perm  # dt
    _take(mixer.in_proj.weight, 0, rows)
    _take(mixer.in_proj.bias, 0, rows)
    conv = _block_index(conv_dim, 0, ch)
    _take(mixer.conv1d.weight, 0, conv)
    _take(mixer.conv1d.bias, 0, conv)
    for param in (mixer.A_log, mixer.D, mixer.dt_bias):
        _take(param, 0, perm)
    _take(mixer.norm.weight, 0, ch)
    _take(mixer.out_proj.weight, 1, ch)


def permute_mamba2_state(mixer: HybridMamba2Mixer, perm) -> None:
    """State dimensions of each group: `perm` (G, N), or (N,) for every group; B and C alike."""
    g, n, e = mixer.n_groups, mixer.d_state, mixer.d_inner
    perm = torch.as_tensor(perm, dtype=torch.long)
    perm = perm.expand(g, n) if perm.dim() == 1 else perm
    if perm.shape != (g, n):
        raise ValueError(f"Mamba-2 state: expected ({g}, {n}) or ({n},), got {tuple(perm.shape)}")
    conv = torch.arange(mixer.conv_dim)
    for k in range(g):
        pk = check_permutation(perm[k], n, f"Mamba-2 state of group {k}")
        for start in (e + k * n, e + g * n + k * n):  # B of group k, C of group k (conv channel numbering)
            conv[start : start + n] = start + pk
    rows = torch.arange(mixer.in_proj.out_features)
    rows[e : e + mixer.conv_dim] = e + conv  # xBC follows z in in_proj
    _take(mixer.in_proj.weight, 0, rows)
    _take(mixer.in_proj.bias, 0, rows)
    _take(mixer.conv1d.weight, 0, conv)
    _take(mixer.conv1d.bias, 0, conv)


def permute_mamba1_channels(mixer: HybridMamba1Mixer, perm) -> None:
    """New inner channel i is old channel perm[i]."""
    e = mixer.d_inner
    perm = check_permutation(perm, e, "Mamba-1 channels")
    rows = torch.cat([perm, e + perm])  # x, z
    _take(mixer.in_proj.weight, 0, rows)
    _take(mixer.in_proj.bias, 0, rows)
    _take(mixer.conv1d.weight, 0, perm)
    _take(mixer.conv1d.bias, 0, perm)
    _take(mixer.x_proj.weight, 1, perm)
    _take(mixer.dt_proj.weight, 0, perm)
    _take(mixer.dt_proj.bias, 0, perm)
    _take(mixer.A_log, 0, perm)
    _take(mixer.D, 0, perm)
    _take(mixer.out_proj.weight, 1, perm)


def permute_mamba1_state(mixer: HybridMamba1Mixer, perm) -> None:
    """State dimensions: rows of B and of C in `x_proj`, columns of `A_log`."""
    n, r = mixer.d_state, mixer.dt_rank
    perm = check_permutation(perm, n, "Mamba-1 state")
    rows = torch.arange(r + 2 * n)
    rows[r : r + n] = r + perm
    rows[r + n :] = r + n + perm
    _take(mixer.x_proj.weight, 0, rows)
    _take(mixer.A_log, 1, perm)


def permute_mlp(mlp: HybridMambaMLP, perm) -> None:
    """Intermediate channels of the SwiGLU MLP."""
    perm = check_permutation(perm, mlp.down_proj.in_features, "MLP channels")
    for proj in (mlp.gate_proj, mlp.up_proj):
        _take(proj.weight, 0, perm)
        _take(proj.bias, 0, perm)
    _take(mlp.down_proj.weight, 1, perm)


APPLY = {
    "mamba2_heads": permute_mamba2_heads,
    "mamba2_state": permute_mamba2_state,
    "mamba1_channels": permute_mamba1_channels,
    "mamba1_state": permute_mamba1_state,
    "mlp": permute_mlp,
}


def _targets(model: HybridMambaForCausalLM, mlp: bool = True) -> dict[str, tuple[str, nn.Module]]:
    """key ("model.layers.3.mamba:mamba2_heads") -> (kind, module), for every permutable set."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, HybridMamba2Mixer):
            out[f"{name}:mamba2_heads"] = ("mamba2_heads", module)
            out[f"{name}:mamba2_state"] = ("mamba2_state", module)
        elif isinstance(module, HybridMamba1Mixer):
            out[f"{name}:mamba1_channels"] = ("mamba1_channels", module)
            out[f"{name}:mamba1_state"] = ("mamba1_state", module)
        elif mlp and isinstance(module, HybridMambaMLP):
            out[f"{name}:mlp"] = ("mlp", module)
    return out


def apply_permutations(model: HybridMambaForCausalLM, perms: dict, inplace: bool = True) -> HybridMambaForCausalLM:
    """Apply `perms` (as returned by `csp_permute`) to `model`, or to a deep copy when not `inplace`."""
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    targets = _targets(model)
    for key, perm in perms.items():
        if key not in targets:
            raise ValueError(f"No permutable set {key!r} in this model; it has {sorted(targets)}")
        kind, module = targets[key]
        APPLY[kind](module, perm)
    return model


# choosing them from activation correlations


class _Moments:
    """Running sums for the correlation matrix of a (samples, units) stream, in float64."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        if self.s is None:
            self.s = x.new_zeros(x.shape[1])
            self.ss = x.new_zeros(x.shape[1], x.shape[1])
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.T @ x

    def corr(self) -> torch.Tensor:
        mean = self.s / self.n
        cov = self.ss / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        c = cov / torch.outer(std, std)
        c[~torch.isfinite(c)] = 0.0  # a constant unit is correlated with nothing
        return c.clamp(-1, 1)


def _greedy_from(s: torch.Tensor, start: int) -> torch.Tensor:
    order = [start]
    used = torch.zeros(s.shape[0], dtype=torch.bool)
    used[start] = True
    for _ in range(s.shape[0] - 1):
        nxt = int(s[order[-1]].masked_fill(used, -1.0).argmax())
        order.append(nxt)
        used[nxt] = True
    return torch.tensor(order, dtype=torch.long)


def seriate(corr: torch.Tensor, all_starts_below: int = 64) -> torch.Tensor:
    """Greedy nearest-neighbour order on |corr|: start at a unit, then append the unused unit most
    correlated with the last one placed. With fewer than `all_starts_below` units every start is tried,
    else the unit with the largest total |corr| starts. The identity is kept when no greedy order has a
    higher mean neighbour correlation (a greedy path can end on poorly matched leftovers)."""
    n = corr.shape[0]
    s = corr.abs().double().clone()
    s.fill_diagonal_(0.0)
    starts = range(n) if n < all_starts_below else [int(s.sum(1).argmax())]
    best, best_score = torch.arange(n), adjacent_correlation(s)
    for start in starts:
        order = _greedy_from(s, start)
        score = adjacent_correlation(s, order)
        if score > best_score + 1e-12:
            best, best_score = order, score
    return best


def adjacent_correlation(corr: torch.Tensor, perm: torch.Tensor | None = None) -> float:
    """Mean |corr| of neighbours in the order `perm` (identity when None)."""
    n = corr.shape[0]
    if n < 2:
        return 0.0
    perm = torch.arange(n) if perm is None else torch.as_tensor(perm)
    return float(corr.abs()[perm[:-1], perm[1:]].mean())


def _conv_silu(mixer: HybridMamba2Mixer, xBC: torch.Tensor) -> torch.Tensor:
    """The mixer's causal conv + SiLU on in_proj's xBC output (B, T, conv_dim), without a cache."""
    w = mixer.conv1d.weight.squeeze(1)
    out = mixer.ops.causal_conv1d(xBC.transpose(1, 2).to(w.dtype), w, mixer.conv1d.bias, silu=True)
    return out.transpose(1, 2)


@torch.no_grad()
def collect_correlations(model: HybridMambaForCausalLM, calibration_ids: torch.Tensor, mlp: bool = True) -> dict:
    """key -> correlation matrix (per group for heads and Mamba-2 state: a list of matrices), from the
    activations of `model` on `calibration_ids` (rows of token ids, one forward per row)."""
    moments: dict[str, list[_Moments] | _Moments] = {}
    hooks = []

    def groups(key, n):
        return moments.setdefault(key, [_Moments() for _ in range(n)])

    for key, (kind, module) in _targets(model, mlp).items():
        if kind == "mamba2_heads":
            m = module

            def heads(mod, args, key=key, m=m):
                y = args[0].float()  # (B, T, d_inner): gated-norm output
                rms = y.view(*y.shape[:-1], m.num_heads, m.head_dim).pow(2).mean(-1).sqrt()
                hg = m.num_heads // m.n_groups
                for k, acc in enumerate(groups(key, m.n_groups)):
                    acc.add(rms[..., k * hg : (k + 1) * hg])

            hooks.append(module.out_proj.register_forward_pre_hook(heads))
        elif kind == "mamba2_state":
            m = module

            def state(mod, args, out, key=key, m=m):
                e, g, n = m.d_inner, m.n_groups, m.d_state
                xBC = _conv_silu(m, out[..., e : e + m.conv_dim]).float()
                B = xBC[..., e : e + g * n].unflatten(-1, (g, n))
                C = xBC[..., e + g * n :].unflatten(-1, (g, n))
                accs = groups(key, 2 * g)
                for k in range(g):
                    accs[k].add(B[..., k, :])
                    accs[g + k].add(C[..., k, :])

            hooks.append(module.in_proj.register_forward_hook(state))
        elif kind == "mamba1_channels":
            hooks.append(
                module.out_proj.register_forward_pre_hook(
                    lambda mod, args, key=key: moments.setdefault(key, _Moments()).add(args[0].float())
                )
            )
        elif kind == "mamba1_state":
            m = module

            def state1(mod, args, out, key=key, m=m):
                r, n = m.dt_rank, m.d_state
                accs = groups(key, 2)
                accs[0].add(out[..., r : r + n].float())
                accs[1].add(out[..., r + n :].float())

            hooks.append(module.x_proj.register_forward_hook(state1))
        else:  # mlp
            hooks.append(
                module.down_proj.register_forward_pre_hook(
                    lambda mod, args, key=key: moments.setdefault(key, _Moments()).add(args[0].float())
                )
            )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for row in calibration_ids:
            model(input_ids=row[None].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    corrs = {}
    for key, acc in moments.items():
        kind = key.rsplit(":", 1)[1]
        if kind == "mamba2_state":  # per group: the mean of B's and C's correlation matrices
            g = len(acc) // 2
            corrs[key] = [(acc[k].corr() + acc[g + k].corr()) / 2 for k in range(g)]
        elif kind == "mamba1_state":
            corrs[key] = (acc[0].corr() + acc[1].corr()) / 2
        elif kind == "mamba2_heads":
            corrs[key] = [a.corr() for a in acc]
        else:
            corrs[key] = acc.corr()
    return corrs


def choose_permutations(corrs: dict) -> tuple[dict, dict]:
    """Permutations (as `apply_permutations` takes them) and, per key, the neighbour score before and after."""
    perms, scores = {}, {}
    for key, c in corrs.items():
        kind = key.rsplit(":", 1)[1]
        if kind == "mamba2_heads":  # within each group, then numbered globally
            hg = c[0].shape[0]
            parts = [k * hg + seriate(ck) for k, ck in enumerate(c)]
            perms[key] = torch.cat(parts)
            before = sum(adjacent_correlation(ck) for ck in c) / len(c)
            after = sum(adjacent_correlation(ck, p - k * hg) for k, (ck, p) in enumerate(zip(c, parts))) / len(c)
        elif kind == "mamba2_state":
            parts = [seriate(ck) for ck in c]
            perms[key] = torch.stack(parts)
            before = sum(adjacent_correlation(ck) for ck in c) / len(c)
            after = sum(adjacent_correlation(ck, p) for ck, p in zip(c, parts)) / len(c)
        else:
            perms[key] = seriate(c)
            before, after = adjacent_correlation(c), adjacent_correlation(c, perms[key])
        scores[key] = {"adjacent_abs_corr_before": before, "adjacent_abs_corr_after": after}
    return perms, scores


def csp_permute(
    model: HybridMambaForCausalLM, calibration_ids: torch.Tensor, mlp: bool = True, report: dict | None = None
) -> dict:
    """Choose every permutation from activation correlations on `calibration_ids` (B, T) and apply it in
    place. Returns {key: permutation} (see `apply_permutations`); `report`, when given, receives the
    neighbour scores per key."""
    if calibration_ids.dim() != 2:
        raise ValueError(f"calibration_ids must be (rows, tokens), got shape {tuple(calibration_ids.shape)}")
    perms, scores = choose_permutations(collect_correlations(model, calibration_ids, mlp))
    apply_permutations(model, perms)
    if report is not None:
        report.update(scores)
    moved = sum(bool((p != torch.arange(p.shape[-1])).any()) for p in perms.values())
    logger.info("CSP: %d permutable sets, %d of them reordered.", len(perms), moved)
    return perms


def calibration_ids(vocab_size: int, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """Uniformly random token ids, (ceil(tokens / seq_len), seq_len), from a seeded generator."""
    rows = max(1, -(-tokens // seq_len))
    return torch.randint(0, vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


# command line


@dataclass
class CSPArgs:
    """Permute a saved HybridMambaForCausalLM's heads, channels and state dimensions (same function)."""

    model: Path = field(metadata={"help": "Folder written by save_pretrained (a hybrid_mamba model)."})
    out: Path = field(metadata={"help": "Output folder (replaced as a whole when the permutation succeeds)."})
    calibration_tokens: int = field(default=4096, metadata={"help": "Calibration tokens (random ids, seeded)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration row."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration ids."})
    mlp: bool = field(default=True, metadata={"help": "Also permute the MLP channels (--no_mlp: leave them)."})

    def __post_init__(self):
        if self.calibration_tokens < 2 or self.seq_len < 2:
            raise ValueError("calibration_tokens and seq_len must be at least 2.")


def main(argv=None):
    args = parse_args(CSPArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config_path = args.model / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{args.model} has no config.json: give a folder written by save_pretrained.")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != HybridMambaConfig.model_type:
        raise ValueError(f"{args.model} holds model_type {model_type!r}; CSP permutes hybrid_mamba models.")
    from hybrid_mamba.modeling.convert import copy_tokenizer

    model = HybridMambaForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    ids = calibration_ids(model.config.vocab_size, args.calibration_tokens, args.seq_len, args.seed)
    report: dict = {}
    perms = csp_permute(model, ids, mlp=args.mlp, report=report)
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(args.model, tmp)
        write_json_atomic(
            tmp / "csp.json",
            {
                "source": str(args.model),
                "calibration": {"tokens": int(ids.numel()), "seq_len": args.seq_len, "seed": args.seed},
                "permutations": {k: p.tolist() for k, p in perms.items()},
                "scores": report,
            },
        )
    logger.info("Saved the permuted model to %s (permutations in csp.json).", args.out)


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
