"""Importance-guided LoRA ranks at a fixed budget of trainable parameters.

Importance. On a few training batches, the gradient of the task loss with respect to each target
weight W (out x in) is accumulated: G = sum over tokens of dL/dy x^T, read from hooks on the layer
(so it works on a frozen or a 4-bit weight, whose own .grad never exists). The best rank-k update of
Frobenius norm 1 lowers the loss, to first order, by sqrt(sigma_1^2 + ... + sigma_k^2) (singular
values of G): the k-th direction of a module adds sigma_k^2 to that squared gain, and costs in + out
parameters.

Allocation. Every module starts at `r_min`; then, while the budget allows, the next rank unit goes
to the module whose next sigma_k^2 per parameter is largest (a greedy knapsack over decreasing
gains). The budget is what uniform LoRA of rank r spends on the same modules, so both arms train the
same number of parameters (or fewer for the allocated arm, by less than one rank unit). The result
is peft's `rank_pattern`, with `alpha_pattern` keeping lora_alpha / r the same for every module.

    python -m hybrid_mamba.trainers.rank_allocation --config trainers/configs/finetune_classification.yaml \
        --seeds 0 1 2 3 4 --out results/rank_allocation --max_steps 100 --eval_every 100

compares both arms across seeds (one fine-tuning run per arm and seed, `python -m hybrid_mamba.trainers.finetune`;
flags it does not know go to every run) and writes OUT/rank_allocation.{json,md} with mean, std,
95% interval per arm, and of the paired per-seed differences with their signs and a Wilcoxon
signed-rank p-value; the runs go under OUT/runs/.
"""

import heapq
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_mamba.common.args import parse_known_args
from hybrid_mamba.common.machine import machine
from hybrid_mamba.common.stats import format_summary, paired, summarize

from .peft_targets import lora_parameter_count, target_module_names
from .sweep import check_config, float_metrics, run_seed

logger = logging.getLogger(__name__)


def measure_importance(model, batches, targets: list[str]) -> dict[str, torch.Tensor]:
    """Singular values (descending) of the accumulated weight gradient of every target module."""
    names = target_module_names(model, targets)
    modules = dict(model.named_modules())
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            x = args[0].detach()

            def grad_hook(g):
                g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()  # (N, out), (N, in)
                update = g2.T @ x2  # (out, in)
                grads[name] = grads[name] + update if name in grads else update

            if output.requires_grad:
                output.register_hook(grad_hook)

        return forward_hook

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    # The hooks need a graph through the layers even when every weight is frozen.
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    # Only the hooks' products are needed: no weight gradient is computed or stored.
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n in names if n not in grads]
    if missing:
        raise RuntimeError(
            f"No gradient reached {missing[:3]} (and {max(0, len(missing) - 3)} more) while measuring importance."
        )
    return {n: torch.linalg.svdvals(grads[n]) for n in names}


def allocate_ranks(model, spectra: dict[str, torch.Tensor], budget: int, r_min: int, r_max: int) -> dict[str, int]:
    """Ranks per module name, greedy on sigma_k^2 / (in + out) under `budget` trainable parameters."""
    modules = dict(model.named_modules())
    cost = {n: lora_parameter_count(modules[n], 1) for n in spectra}
    ranks = {n: r_min for n in spectra}
    spent = sum(r_min * c for n, c in cost.items())
    if spent > budget:
        raise ValueError(f"r_min={r_min} on every module already spends {spent} parameters, over the budget {budget}.")
    heap = [(-(float(s[r_min]) ** 2) / cost[n], n) for n, s in spectra.items() if r_min < min(r_max, len(s))]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if spent + cost[n] > budget:
            continue  # a cheaper module may still fit
        ranks[n] += 1
        spent += cost[n]
        k = ranks[n]
        if k < min(r_max, len(spectra[n])):
            heapq.heappush(heap, (-(float(spectra[n][k]) ** 2) / cost[n], n))
    return ranks


def rank_and_alpha_patterns(ranks: dict[str, int], lora_r: int, lora_alpha: float) -> tuple[dict, dict]:
    """peft `rank_pattern` / `alpha_pattern` (keys escaped: peft reads them as regexes)."""
    rank_pattern = {re.escape(n): r for n, r in ranks.items()}
    alpha_pattern = {re.escape(n): lora_alpha * r / lora_r for n, r in ranks.items()}
    return rank_pattern, alpha_pattern


def uniform_budget(model, targets: list[str], r: int) -> int:
    modules = dict(model.named_modules())
    return sum(lora_parameter_count(modules[n], r) for n in target_module_names(model, targets))


# Comparison across seeds


@dataclass
class RankAllocationArgs:
    """Uniform against importance-allocated LoRA ranks over seeds; any other --field value flag goes to every run."""

    config: str = field(metadata={"help": "A finetune YAML (classification or chat)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; each runs both arms."})
    out: str = field(
        default="results/rank_allocation", metadata={"help": "Folder for rank_allocation.{json,md} and runs/."}
    )


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args, extra = parse_known_args(RankAllocationArgs, argv)  # anything else goes to every finetune run
    check_config(args.config, extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {arm: {} for arm in ("uniform", "importance")}
    for seed in args.seeds:
        for arm in runs:
            summary = run_seed(
                args.config, seed, out / "runs" / f"{arm}_seed{seed}", ["--rank_allocation", arm, *extra]
            )
            runs[arm][seed] = {
                "final_eval": summary["final_eval"],
                "trainable_parameters": summary["finetune"]["trainable_parameters"],
                "lora_parameters": summary["finetune"]["lora_parameters"],
                "ranks": summary["finetune"].get("ranks"),
            }
    metric_names = float_metrics(runs["uniform"][args.seeds[0]]["final_eval"])
    result = {
        "command": "python -m hybrid_mamba.trainers.rank_allocation "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config,
        "seeds": args.seeds,
        "machine": machine(threads=torch.get_num_threads()),
        "arms": {
            arm: {
                "metrics": {m: summarize([r["final_eval"][m] for r in per_seed.values()]) for m in metric_names},
                "lora_parameters": sorted({r["lora_parameters"] for r in per_seed.values()}),
                "per_seed": per_seed,
            }
            for arm, per_seed in runs.items()
        },
    }
    # paired differences (importance - uniform) per seed: the seeds share data order and head init
    result["difference"] = {
        m: paired([runs["importance"][s]["final_eval"][m] - runs["uniform"][s]["final_eval"][m] for s in args.seeds])
        for m in metric_names
    }
    (out / "rank_allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "rank_allocation.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    metrics = list(result["difference"])
    lines = [
        f"Seeds {result['seeds']}; mean ± std (95% CI). LoRA parameters: "
        + ", ".join(f"{arm} {result['arms'][arm]['lora_parameters']}" for arm in result["arms"]),
        "",
        "| metric | uniform | importance | importance - uniform (paired) | seeds above / below / at zero | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics:
        d = result["difference"][m]
        p = "-" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.3f}"
        lines.append(
            f"| {m} | {format_summary(result['arms']['uniform']['metrics'][m])} "
            f"| {format_summary(result['arms']['importance']['metrics'][m])} "
            f"| {format_summary(d)} | {d['above']} / {d['below']} / {d['zero']} | {p} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
