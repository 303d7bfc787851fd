"""The "co-design" table, measured: CSP, SDM pruning and importance-guided LoRA ranks on the sentiment demo.

    python -m hybrid_mamba.eval_harness.bench_codesign --out docs/results/bench_codesign [--seeds 0 1 2 3 4]
        [--max_steps 100] [--sparsity 0.3] [--base runs/demo-base] [--work runs/codesign]
    python -m hybrid_mamba.eval_harness.bench_codesign --out docs/results/bench_codesign --render   # report only

Bases (save_pretrained folders under --work/bases):
- base: --base (runs/demo-base by default, built by trainers/demo_base.py when missing: a random-init
  `debug` model with a tokenizer trained on the demo data; not pretrained);
- csp: CSP(base) (modeling/csp.py), calibrated on the demo training sentences (tokenised with the
  base's tokenizer, packed in rows of --seq_len tokens);
- sdm: SDM(base): `trainers/prune.py` at --sparsity (hard-concrete masks trained with the LM loss for
  --prune_steps steps, then removal) on a pretraining DATA/ whose tokenizer is the base's: --data, or
  the demo recipe (data_scripts/recipes/demo.yaml) rebuilt at --work/data with the base's tokenizer and
  --data_tokens tokens;
- full: CSP(SDM(base));
- dense_trained (unless --no_dense_control): the base trained for the same steps on the same data with
  the LM loss alone (trainers/pretrain.py --init_from), because mask training also trains the weights:
  M_SDM - M_dense_trained is pruning without the extra training.

Arms (one fine-tuning run per arm and seed, `python -m hybrid_mamba.trainers.finetune` with the
classification config, --max_steps steps; every arm runs every seed, so they pair by seed):
M_base = base + uniform LoRA; M_CSP = csp + uniform; M_SDM = sdm + uniform; M_SGH = base + importance
ranks (trainers/rank_allocation.py, same budget as uniform); M_full = full + importance;
M_dense_trained = dense_trained + uniform (the control).

Per run: validation accuracy, F1, MCC (summary.json final_eval) and trainable parameters. Per base (a
merged LoRA has the base's architecture, so the base stands for the deployed model of its arms):
- parameters, and FLOPs per token of the classification forward (batch 1, --seq_len tokens) counted by
  torch.utils.flop_counter.FlopCounterMode (matmuls, including the chunked scan's einsums, and
  convolutions; elementwise work is not counted);
- CPU latency of the classification forward at batch 1 and 16, --seq_len tokens of validation text per
  row: the bases and an unpermuted deep copy of the base (the control) take turns in every repetition,
  the order rotated; per base the median, and the per-repetition ratio to the base summarised as a
  geometric mean with a 95% t-interval of the log ratios;
- inference memory, in a fresh subprocess per base and repeat: the bytes of the parameters, the RSS
  growth while loading, and the peak RSS growth during the first forward at batch 16 (VmHWM after
  resetting it through /proc/self/clear_refs; ru_maxrss when that is not writable).

Writes bench_codesign.json (every number, the machine, the load average, the arguments) and
bench_codesign.md (tables, paired differences against M_base with signs and Wilcoxon p, and one verdict
line per hypothesis generated from the numbers) into --out. --render measures nothing: it regenerates the
verdicts and the markdown from the saved JSON. A latency change counts as an effect only when the 95%
interval of its ratio to the base, and of its ratio to the unpermuted copy, both exclude 1 on the same side.
"""

import copy
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import atomic_dir, write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.common.stats import format_summary, paired, summarize
from hybrid_mamba.eval_harness.bench_speed import timed, turn_order
from hybrid_mamba.modeling import HybridMambaForCausalLM, HybridMambaForSequenceClassification
from hybrid_mamba.modeling.csp import csp_permute

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "data_scripts" / "recipes" / "demo.yaml"
DEFAULT_BASE = "runs/demo-base"
# arm -> (base, rank allocation)
ARMS = {
    "M_base": ("base", "uniform"),
    "M_CSP": ("csp", "uniform"),
    "M_SDM": ("sdm", "uniform"),
    "M_SGH": ("base", "importance"),
    "M_full": ("full", "importance"),
}
CONTROL_ARM = {"M_dense_trained": ("dense_trained", "uniform")}
METRICS = ("val_accuracy", "val_f1", "val_matthews_correlation")
BATCHES = (1, 16)
# What the seed document claimed.
CLAIMED_CSP_LATENCY_RATIO = 0.76
CLAIMED_SDM_FLOPS_CUT = (0.25, 0.34)


@dataclass
class BenchCodesignArgs:
    """CSP, SDM and importance-guided LoRA ranks, alone and together, on the sentiment demo over seeds."""

    out: str = field(default="docs/results/bench_codesign", metadata={"help": "Folder for bench_codesign.json/.md."})
    finetune_config: str = field(
        default="trainers/configs/finetune_classification.yaml", metadata={"help": "The classification finetune YAML."}
    )
    base: str = field(
        default=DEFAULT_BASE,
        metadata={"help": "Base model folder; runs/demo-base is built (trainers/demo_base.py) when missing."},
    )
    work: str = field(default="runs/codesign", metadata={"help": "Scratch folder: data/, bases/, runs/."})
    data: str = field(
        default="",
        metadata={"help": "DATA/ for the mask training (its tokenizer must be the base's); empty: built in WORK/data."},
    )
    data_tokens: int = field(default=400_000, metadata={"help": "Tokens of the DATA/ built from the demo recipe."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; every arm runs each."})
    max_steps: int = field(default=100, metadata={"help": "Fine-tuning steps per run."})
    finetune_threads: int = field(
        default=1, metadata={"help": "Threads of the mask training, the dense control and each fine-tuning run."}
    )
    sparsity: float = field(default=0.3, metadata={"help": "SDM target sparsity (fraction of non-embedding params)."})
    prune_steps: int = field(default=150, metadata={"help": "Mask-training steps (and dense-control steps)."})
    prune_micro_batch_size: int = field(default=8, metadata={"help": "Sequences per mask-training step."})
    dense_control: bool = field(
        default=True, metadata={"help": "Also train the dense base for the same steps (--no_dense_control: skip)."}
    )
    calibration_tokens: int = field(default=4096, metadata={"help": "CSP calibration tokens of demo text."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per row for latency, FLOPs and calibration."})
    latency_reps: int = field(default=30, metadata={"help": "Timed repetitions per batch size (after warmup)."})
    latency_warmup: int = field(default=3, metadata={"help": "Untimed repetitions first."})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch threads for latency and memory (1: on a shared machine 2 threads spin against other jobs)."
        },
    )
    memory_repeats: int = field(default=2, metadata={"help": "Fresh subprocesses per base for the memory figures."})
    render: bool = field(
        default=False,
        metadata={"help": "Measure nothing: rewrite the verdicts and bench_codesign.md from OUT/bench_codesign.json."},
    )

    def __post_init__(self):
        if self.threads < 1 or self.finetune_threads < 1:
            raise ValueError("--threads and --finetune_threads must be at least 1.")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in (0, 1), got {self.sparsity}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and at least one, got {self.seeds}.")
        if min(self.max_steps, self.prune_steps, self.latency_reps, self.memory_repeats, self.seq_len) < 1:
            raise ValueError("--max_steps, --prune_steps, --latency_reps, --memory_repeats, --seq_len must be >= 1.")
        if not Path(self.finetune_config).is_file():
            raise FileNotFoundError(f"--finetune_config {self.finetune_config} does not exist.")

    def arms(self) -> dict:
        return {**ARMS, **(CONTROL_ARM if self.dense_control else {})}


# text and ids


def _sentences(path: Path) -> list[str]:
    """The sentence column of a GLUE-style TSV with a header row."""
    return [row.split("\t")[0] for row in path.read_text().splitlines()[1:] if row.strip()]


def text_rows(tokenizer, sentences: list[str], seq_len: int, rows: int) -> torch.Tensor:
    """(rows, seq_len) ids: the sentences tokenised, joined with EOS and cut into rows (cycled if short)."""
    stream = []
    for s in sentences:
        stream += tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not stream:
        raise ValueError("No tokens in the demo sentences.")
    need = rows * seq_len
    stream = (stream * (need // len(stream) + 1))[:need]
    return torch.tensor(stream, dtype=torch.long).view(rows, seq_len)


def demo_files(config: str) -> tuple[Path, Path]:
    cfg = yaml.safe_load(Path(config).read_text())
    return Path(cfg["train_file"]), Path(cfg["validation_file"])


# bases


def ensure_base(base: str) -> Path:
    path = Path(base)
    if (path / "config.json").is_file():
        return path
    if Path(base) != Path(DEFAULT_BASE):
        raise FileNotFoundError(f"--base {base} has no config.json: give a save_pretrained folder.")
    from hybrid_mamba.trainers.demo_base import make_demo_base

    logger.info("Building %s (trainers/demo_base.py, as the README's demo does).", base)
    return make_demo_base(path)


def _vocab(tokenizer) -> dict:
    return tokenizer.get_vocab()


def ensure_data(args: BenchCodesignArgs, base: Path) -> Path:
    """A DATA/ folder whose tokenizer is the base's: --data (checked), or the demo recipe rebuilt with it."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(base)
    if args.data:
        data = Path(args.data)
        if not (data / "tokenizer").is_dir():
            raise FileNotFoundError(f"--data {data} has no tokenizer/: give a DATA/ folder from data_scripts.")
        if _vocab(AutoTokenizer.from_pretrained(data / "tokenizer")) != _vocab(base_tok):
            raise ValueError(f"--data {data} uses another tokenizer than {base}: mask training needs the same ids.")
        return data
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe.update(name="demo_base_tokenizer", total_tokens=args.data_tokens, seq_len=256)
    recipe["tokenizer"] = {"path": str(base.resolve())}
    recipe_path = work / "data_recipe.yaml"
    write_text_atomic(recipe_path, yaml.safe_dump(recipe, sort_keys=False))
    data = work / "data"
    cmd = [
        sys.executable,
        "-m",
        "hybrid_mamba.data_scripts.prepare",
        "--recipe",
        str(recipe_path),
        "--output",
        str(data),
    ]
    logger.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {data} failed: {done.stderr.strip().splitlines()[-1:]}")
    return data


@torch.no_grad()
def max_output_diff(dir_a: Path, dir_b: Path, ids: torch.Tensor) -> float:
    """Largest |logit| difference of two causal-LM folders on `ids`."""
    a = HybridMambaForCausalLM.from_pretrained(dir_a, dtype=torch.float32).eval()
    b = HybridMambaForCausalLM.from_pretrained(dir_b, dtype=torch.float32).eval()
    return float((a(input_ids=ids, use_cache=False).logits - b(input_ids=ids, use_cache=False).logits).abs().max())


def build_csp(src: Path, dst: Path, calibration: torch.Tensor) -> dict:
    """CSP(src) saved to dst (with tokenizer and csp.json); returns what csp.json holds, less the permutations."""
    from hybrid_mamba.modeling.convert import copy_tokenizer

    model = HybridMambaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    scores: dict = {}
    perms = csp_permute(model, calibration, report=scores)
    moved = sum(bool((p != torch.arange(p.shape[-1])).any()) for p in perms.values())
    report = {
        "source": str(src),
        "calibration": {
            "text": "demo sentiment training sentences",
            "rows": calibration.shape[0],
            "seq_len": calibration.shape[1],
        },
        "sets": len(perms),
        "reordered": moved,
        "scores": scores,
    }
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(Path(src), tmp)
        write_json_atomic(tmp / "csp.json", {**report, "permutations": {k: p.tolist() for k, p in perms.items()}})
    report["max_abs_logit_diff"] = max_output_diff(src, dst, calibration[:2])
    return report


def build_sdm(src: Path, dst: Path, data: Path, run_dir: Path, sparsity: float, steps: int, micro_batch: int) -> dict:
    """SDM(src) through trainers/prune.py (in this process, its command-line entry point); pruning.json."""
    from hybrid_mamba.trainers.prune import main as prune_main

    report = prune_main(
        [
            "--model", str(src), "--data", str(data), "--sparsity", str(sparsity), "--out", str(dst),
            "--output_dir", str(run_dir), "--max_steps", str(steps), "--eval_every", str(steps),
            "--checkpoint_every", str(10 * steps), "--micro_batch_size", str(micro_batch), "--resume", "false",
        ]
    )  # fmt: skip
    return report


def build_dense_control(src: Path, data: Path, run_dir: Path, steps: int, micro_batch: int) -> Path:
    """src trained with the LM loss for the mask training's steps, learning rate and warmup (trainers/pretrain.py)."""
    from hybrid_mamba.trainers.pretrain import main as pretrain_main
    from hybrid_mamba.trainers.prune import PruneArgs

    defaults = PruneArgs(model=str(src), out="unused")
    pretrain_main(
        [
            "--data_dir", str(data), "--init_from", str(src), "--output_dir", str(run_dir),
            "--max_steps", str(steps), "--eval_every", str(steps), "--checkpoint_every", str(10 * steps),
            "--micro_batch_size", str(micro_batch), "--learning_rate", str(defaults.learning_rate),
            "--warmup_steps", str(defaults.warmup_steps), "--resume", "false", "--sample_tokens", "8",
        ]
    )  # fmt: skip
    return run_dir / "final"


def build_bases(args: BenchCodesignArgs) -> tuple[dict[str, Path], dict]:
    """{name: folder} of every base, and what building them reported."""
    from transformers import AutoTokenizer

    base = ensure_base(args.base)
    data = ensure_data(args, base)
    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_file, _ = demo_files(args.finetune_config)
    rows = max(1, -(-args.calibration_tokens // args.seq_len))
    calibration = text_rows(tokenizer, _sentences(train_file), args.seq_len, rows)
    bases = {
        "base": base,
        "csp": work / "bases" / "csp",
        "sdm": work / "bases" / "sdm",
        "full": work / "bases" / "full",
    }
    reports: dict = {"data": str(data)}
    reports["csp"] = build_csp(base, bases["csp"], calibration)
    sdm = build_sdm(
        base, bases["sdm"], data, work / "prune_run", args.sparsity, args.prune_steps, args.prune_micro_batch_size
    )
    sdm.pop("model", None)
    reports["sdm"] = sdm
    reports["full"] = build_csp(bases["sdm"], bases["full"], calibration)
    if args.dense_control:
        bases["dense_trained"] = build_dense_control(
            base, data, work / "dense_run", args.prune_steps, args.prune_micro_batch_size
        )
        summary = json.loads((work / "dense_run" / "summary.json").read_text())
        reports["dense_trained"] = {"steps": summary["steps"], "final_val_loss": summary["final_val_loss"]}
    return bases, reports


# per-base measurements


def load_classifier(folder: Path, seed: int = 0) -> HybridMambaForSequenceClassification:
    """The classification model of a base folder (num_labels 2, the head seeded: it does not affect timing)."""
    torch.manual_seed(seed)
    config = json.loads((Path(folder) / "config.json").read_text())
    return HybridMambaForSequenceClassification.from_pretrained(
        folder, num_labels=2, pad_token_id=config.get("pad_token_id"), dtype=torch.float32
    ).eval()


@torch.no_grad()
def size_row(model, seq_len: int) -> dict:
    """Parameters and counted forward FLOPs per token (batch 1, seq_len tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    cfg = model.config
    return {
        "parameters": total,
        "non_embedding_parameters": total - emb,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "flops_per_token": counter.get_total_flops() / seq_len,
        "mamba_d_inner_per_layer": cfg.mamba_d_inner_per_layer,
        "intermediate_size_per_layer": cfg.intermediate_size_per_layer,
    }


def ratio_summary(ratios: list[float]) -> dict:
    """Geometric mean of per-repetition ratios with a 95% t-interval (computed on the logs)."""
    s = summarize([math.log(r) for r in ratios])
    return {
        "geomean": math.exp(s["mean"]),
        "ci95": None if s["ci95"] is None else [math.exp(s["ci95"][0]), math.exp(s["ci95"][1])],
        "median": statistics.median(ratios),
        "n": s["n"],
    }


@torch.no_grad()
def measure_latency(models: dict, rows: torch.Tensor, batches, reps: int, warmup: int) -> dict:
    """Per batch size: every model's times, median, and per-repetition ratio to "base"."""
    names = tuple(models)
    out = {}
    for b in batches:
        ids = rows[:b]
        times = {n: [] for n in names}
        for i in range(warmup + reps):
            for n in turn_order(names, i):
                dt = timed(lambda n=n: models[n](input_ids=ids))
                if i >= warmup:
                    times[n].append(dt)
        res = {n: {"times_s": ts, "median_s": statistics.median(ts)} for n, ts in times.items()}
        res["ratio_to_base"] = {
            n: ratio_summary([t / tb for t, tb in zip(times[n], times["base"])]) for n in names if n != "base"
        }
        out[str(b)] = res
        gc.collect()
    return out


def _proc_status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in text.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }


def memory_probe(folder: str, batch: int, seq_len: int, threads: int) -> dict:
    """Run in a fresh process: RSS growth on loading the classifier, and the peak RSS growth of its first forward."""
    import resource

    torch.set_num_threads(threads)
    ids = torch.randint(3, 100, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before_load = _proc_status()["VmRSS"]
    model = load_classifier(Path(folder))
    gc.collect()
    loaded = _proc_status()["VmRSS"]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (a high-water mark since start: a lower bound of the forward's growth)"
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(input_ids=ids.clamp_max(model.config.vocab_size - 1))
    status = _proc_status()
    peak = status["VmHWM"] if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = loaded if method.startswith("VmHWM") else ru_before
    return {
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "load_rss_growth_bytes": loaded - before_load,
        "forward_peak_rss_growth_bytes": peak - base,
        "method": method,
    }


def measure_memory(bases: dict, batch: int, seq_len: int, threads: int, repeats: int) -> dict:
    out = {}
    for name, folder in bases.items():
        runs = []
        for _ in range(repeats):
            code = (
                "import json; from hybrid_mamba.eval_harness.bench_codesign import memory_probe; "
                f"print(json.dumps(memory_probe({str(folder)!r}, {batch}, {seq_len}, {threads})))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"memory probe of {folder} failed: {done.stderr.strip()[-500:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        out[name] = {
            "parameter_bytes": runs[0]["parameter_bytes"],
            "load_rss_growth_bytes": [r["load_rss_growth_bytes"] for r in runs],
            "forward_peak_rss_growth_bytes": [r["forward_peak_rss_growth_bytes"] for r in runs],
            "method": runs[0]["method"],
        }
    return out


# fine-tuning runs


def run_arms(args: BenchCodesignArgs, bases: dict) -> dict:
    from hybrid_mamba.trainers.sweep import run_seed

    os.environ["OMP_NUM_THREADS"] = str(args.finetune_threads)  # the runs are child processes
    arms = args.arms()
    runs = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm, (base, allocation) in arms.items():
            extra = [
                "--base_model", str(bases[base]), "--rank_allocation", allocation, "--max_steps", str(args.max_steps),
                "--eval_every", str(args.max_steps), "--checkpoint_every", str(10 * args.max_steps),
            ]  # fmt: skip
            summary = run_seed(args.finetune_config, seed, Path(args.work) / "runs" / f"{arm}_seed{seed}", extra)
            runs[arm][str(seed)] = {
                "final_eval": summary["final_eval"],
                "trainable_parameters": summary["finetune"]["trainable_parameters"],
                "lora_parameters": summary["finetune"]["lora_parameters"],
                "wall_time_s": summary["wall_time_s"],
            }
            logger.info("%s seed %d: %s", arm, seed, {k: round(summary["final_eval"][k], 4) for k in METRICS})
    return runs


def aggregate(runs: dict, seeds: list[int]) -> dict:
    """Per arm: summarize() of each metric and of trainable parameters; per arm but M_base: paired
    differences (arm - M_base, by seed)."""
    keys = [str(s) for s in seeds]
    arms = {}
    for arm, per_seed in runs.items():
        arms[arm] = {m: summarize([per_seed[k]["final_eval"][m] for k in keys]) for m in METRICS}
        arms[arm]["trainable_parameters"] = sorted({per_seed[k]["trainable_parameters"] for k in keys})
    diffs = {
        arm: {
            m: paired([runs[arm][k]["final_eval"][m] - runs["M_base"][k]["final_eval"][m] for k in keys])
            for m in METRICS
        }
        for arm in runs
        if arm != "M_base"
    }
    return {"arms": arms, "difference_vs_M_base": diffs}


# verdicts


def _ratio_text(r: dict) -> str:
    lo, hi = r["ci95"] if r["ci95"] else (float("nan"), float("nan"))
    return f"{r['geomean']:.2f} [{lo:.2f}, {hi:.2f}]"


def _contains(ci, x: float) -> bool:
    return ci is not None and ci[0] <= x <= ci[1]


def _side(ci) -> int:
    """-1: the interval lies below 1, 1: above, 0: it holds 1."""
    return -1 if ci[1] < 1.0 else (1 if ci[0] > 1.0 else 0)


def ratio_effect(r: dict, vs_copy: dict | None = None) -> str:
    """'N% faster' / 'N% slower' when the interval of the ratio to the base excludes 1 and, when given, the
    interval of the ratio to the unpermuted copy excludes 1 on the same side; else 'no effect'."""
    if r["ci95"] is None:
        return "undetermined (one repetition)"
    side = _side(r["ci95"])
    if side == 0:
        return "no effect"
    if vs_copy is not None and vs_copy["ci95"] is not None and _side(vs_copy["ci95"]) != side:
        return "no effect beyond the copy control"
    pct = abs(1 - r["geomean"]) * 100
    return f"{pct:.0f}% faster" if side < 0 else f"{pct:.0f}% slower"


def latency_verdict(lat_b: dict, name: str) -> str:
    """'<ratio to base> (vs copy <ratio to the copy>), <effect>' of one base at one batch size, from the
    per-repetition times (aligned by repetition)."""
    r = lat_b["ratio_to_base"][name]
    if "copy" not in lat_b:
        return f"{_ratio_text(r)}, {ratio_effect(r)}"
    vs_copy = ratio_summary([t / c for t, c in zip(lat_b[name]["times_s"], lat_b["copy"]["times_s"])])
    return f"{_ratio_text(r)} (vs the copy {_ratio_text(vs_copy)}), {ratio_effect(r, vs_copy)}"


def diff_effect(d: dict) -> str:
    if d["ci95"] is None:
        return "undetermined (fewer than two seeds)"
    lo, hi = d["ci95"]
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "no difference resolved"


def _diff_text(d: dict) -> str:
    p = "-" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.3f}"
    ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    return f"{d['mean']:+.3f}{ci}, {d['above']}/{d['below']}/{d['zero']} above/below/zero, Wilcoxon p {p}"


def verdicts(results: dict) -> dict[str, str]:
    """One line per hypothesis of the seed document, from the numbers in `results`."""
    lat, size, diffs = results["latency"], results["size"], results["difference_vs_M_base"]
    acc = "val_accuracy"
    n = len(results["seeds"])
    out = {}

    parts = []
    for b, r in lat.items():
        ctrl = r["ratio_to_base"].get("copy")
        ctrl_text = f"; copy/base {_ratio_text(ctrl)}" if ctrl else ""
        parts.append(f"batch {b}: CSP/base latency {latency_verdict(r, 'csp')}{ctrl_text}")
    claim = CLAIMED_CSP_LATENCY_RATIO
    holds = [b for b, r in lat.items() if _contains(r["ratio_to_base"]["csp"]["ci95"], claim)]
    where = f"inside the interval at batch {', '.join(holds)}" if holds else "outside every interval"
    out["H1_csp_latency"] = (
        "; ".join(parts)
        + f". The claimed ratio {claim:.2f} (a 24% cut) is {where}. "
        + f"FLOPs/token CSP/base {size['csp']['flops_per_token'] / size['base']['flops_per_token']:.3f}; "
        + f"accuracy M_CSP - M_base {_diff_text(diffs['M_CSP'][acc])} ({diff_effect(diffs['M_CSP'][acc])})."
    )

    cut = 1 - size["sdm"]["flops_per_token"] / size["base"]["flops_per_token"]
    lo, hi = CLAIMED_SDM_FLOPS_CUT
    sdm_lat = "; ".join(f"latency SDM/base at batch {b} {latency_verdict(r, 'sdm')}" for b, r in lat.items())
    d = diffs["M_SDM"][acc]
    text = (
        f"FLOPs/token cut {cut * 100:.1f}% at target sparsity {results['args']['sparsity']:.2f} "
        f"({'inside' if lo <= cut <= hi else 'outside'} the claimed {lo * 100:.0f}-{hi * 100:.0f}%; set by the target, "
        f"not discovered); {sdm_lat}; accuracy M_SDM - M_base {_diff_text(d)} ({diff_effect(d)})"
    )
    if "M_dense_trained" in diffs:
        dc = [
            results["runs"]["M_SDM"][k]["final_eval"][acc] - results["runs"]["M_dense_trained"][k]["final_eval"][acc]
            for k in map(str, results["seeds"])
        ]
        dcs = paired(dc)
        text += (
            f"; against the dense base trained as long (M_SDM - M_dense_trained) {_diff_text(dcs)} ({diff_effect(dcs)})"
        )
    out["H2_sdm_flops_accuracy"] = text + "."

    d = diffs["M_SGH"][acc]
    params = results["arms"]
    out["H3_sgh_vs_uniform"] = (
        f"accuracy M_SGH - M_base (importance - uniform ranks, same base) {_diff_text(d)} ({diff_effect(d)}); "
        f"MCC {_diff_text(diffs['M_SGH']['val_matthews_correlation'])}; trainable parameters uniform "
        f"{params['M_base']['trainable_parameters']}, importance {params['M_SGH']['trainable_parameters']}."
    )

    d = diffs["M_full"][acc]
    full_cut = 1 - size["full"]["flops_per_token"] / size["base"]["flops_per_token"]
    full_lat = "; ".join(f"latency full/base at batch {b} {latency_verdict(r, 'full')}" for b, r in lat.items())
    out["H4_full_combined"] = (
        f"FLOPs/token cut {full_cut * 100:.1f}% (the SDM cut; CSP adds none); {full_lat}; "
        f"accuracy M_full - M_base {_diff_text(d)} ({diff_effect(d)})."
    )
    if n < 6:
        out["note"] = (
            f"With {n} seeds the smallest two-sided Wilcoxon p is {2 / 2**n:.4f}: 'resolved' is read from the 95% "
            "t-interval of the paired differences, not from p."
        )
    return out


# report


def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def to_markdown(results: dict) -> str:
    m, a = results["machine"], results["args"]
    arms = results["arms"]
    lines = [
        "# Co-design table (CSP, SDM, importance-guided LoRA ranks), measured",
        "",
        f"{m['cpu']}, {m['cores_available']} cores, torch {m['torch']}, transformers {m['transformers']}, {m['date']}, "
        f"commit {m.get('git_commit')}. 1-minute load average {results['loadavg_1min']['start']:.2f} at the start, "
        f"{results['loadavg_1min']['before_finetune']:.2f} before fine-tuning, {results['loadavg_1min']['end']:.2f} "
        f"at the end (other jobs shared the machine when above ~0). Wall time {results['wall_time_s'] / 60:.1f} min.",
        f"Task: the sentiment demo ({a['finetune_config']}; not GLUE), {a['max_steps']} fine-tuning steps per run, seeds "
        f"{results['seeds']}, paired by seed. Base `{a['base']}`; SDM at target sparsity {a['sparsity']} "
        f"({a['prune_steps']} mask-training steps on `{results['build']['data']}`).",
        "",
        "## Accuracy per arm (mean ± std [95% CI] over seeds)",
        "",
        "| arm | base | ranks | accuracy | F1 | MCC | trainable parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, (base, alloc) in results["arm_definitions"].items():
        cells = " | ".join(format_summary(arms[arm][k]) for k in METRICS)
        lines.append(f"| {arm} | {base} | {alloc} | {cells} | {arms[arm]['trainable_parameters']} |")
    lines += [
        "",
        "## Paired differences against M_base (arm - M_base, per seed)",
        "",
        "| arm | metric | mean ± std [95% CI] | above / below / zero | Wilcoxon p |",
        "|---|---|---|---|---|",
    ]
    for arm, per in results["difference_vs_M_base"].items():
        for metric, d in per.items():
            p = "-" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.3f}"
            lines.append(
                f"| {arm} | {metric} | {format_summary(d)} | {d['above']} / {d['below']} / {d['zero']} | {p} |"
            )
    lat, size, mem = results["latency"], results["size"], results["memory"]
    lines += [
        "",
        f"## Per base: size, FLOPs, CPU latency ({a['threads']} thread(s), fp32, {a['seq_len']} tokens per row), memory",
        "",
        "Latency: median over "
        f"{a['latency_reps']} interleaved repetitions; ratio: geometric mean of the per-repetition ratios to base "
        "[95% CI]; copy is the base deep-copied, unpermuted (the control: what a ratio of two identical models looks "
        "like here). FLOPs counted by FlopCounterMode (matmuls and convolutions). Memory: parameter bytes; RSS growth "
        f"while loading, and peak RSS growth during the first forward at batch {max(BATCHES)} "
        f"({next(iter(mem.values()))['method']}), over {a['memory_repeats']} fresh processes (min-max).",
        "",
        "| base | parameters | non-embedding | FLOPs/token | vs base | "
        + " | ".join(f"b{b} median ms | b{b} ratio" for b in lat)
        + " | parameter MB | load RSS MB | forward peak RSS MB |",
        "|---|---:|---:|---:|---:|" + "---:|---:|" * len(lat) + "---:|---:|---:|",
    ]
    names = list(next(iter(lat.values())).keys())
    names = [n for n in names if n != "ratio_to_base"]
    for name in names:
        s = size.get(name, size["base"] if name == "copy" else None)
        flops = f"{s['flops_per_token']:,.0f} | {s['flops_per_token'] / size['base']['flops_per_token']:.3f}"
        cells = []
        for r in lat.values():
            ratio = "1" if name == "base" else _ratio_text(r["ratio_to_base"][name])
            cells.append(f"{r[name]['median_s'] * 1e3:.2f} | {ratio}")
        mm = mem.get(name)
        if mm:
            load = mm["load_rss_growth_bytes"]
            fwd = mm["forward_peak_rss_growth_bytes"]
            mcells = (
                f"{_mb(mm['parameter_bytes'])} | {_mb(min(load))}-{_mb(max(load))} | {_mb(min(fwd))}-{_mb(max(fwd))}"
            )
        else:
            mcells = "- | - | -"
        lines.append(
            f"| {name} | {s['parameters']:,} | {s['non_embedding_parameters']:,} | {flops} | {' | '.join(cells)} | {mcells} |"
        )
    lines += ["", "## Verdicts (generated from the numbers above)", ""]
    lines += [f"- **{k}**: {v}" for k, v in results["verdicts"].items()]
    lines += [
        "",
        "Scale: a 4-layer, hidden-64 model fine-tuned for a few hundred examples' worth of steps on a 2-class demo; "
        "what holds here says nothing about a 1B model on GLUE, but neither does an unmeasured table. CSP keeps "
        "every shape and operation (modeling/csp.py), so no latency or FLOPs change is expected from it on dense "
        "kernels; the SDM FLOPs cut follows from the target sparsity by construction.",
    ]
    return "\n".join(lines) + "\n"


def run(args: BenchCodesignArgs) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    load = {"start": os.getloadavg()[0]}
    torch.set_num_threads(args.finetune_threads)  # training on a shared machine: more threads can be much slower
    bases, build = build_bases(args)
    torch.set_num_threads(args.threads)
    _, validation_file = demo_files(args.finetune_config)
    tokenizer = AutoTokenizer.from_pretrained(bases["base"])
    rows = text_rows(tokenizer, _sentences(validation_file), args.seq_len, max(BATCHES))
    build["full"]["max_abs_logit_diff_vs_sdm"] = build["full"].pop("max_abs_logit_diff")

    models = {name: load_classifier(folder) for name, folder in bases.items() if name != "dense_trained"}
    size = {name: size_row(model, args.seq_len) for name, model in models.items()}
    models = {
        "base": models["base"],
        "copy": copy.deepcopy(models["base"]),
        **{k: v for k, v in models.items() if k != "base"},
    }
    latency = measure_latency(models, rows, BATCHES, args.latency_reps, args.latency_warmup)
    del models
    gc.collect()
    memory = measure_memory(
        {k: v for k, v in bases.items() if k != "dense_trained"},
        max(BATCHES),
        args.seq_len,
        args.threads,
        args.memory_repeats,
    )
    load["before_finetune"] = os.getloadavg()[0]
    runs = run_arms(args, bases)
    load["end"] = os.getloadavg()[0]
    results = {
        "command": "python -m hybrid_mamba.eval_harness.bench_codesign " + " ".join(sys.argv[1:]),
        "machine": machine(args.threads, libraries=("torch", "transformers", "peft")),
        "args": asdict(args),
        "seeds": args.seeds,
        "loadavg_1min": load,
        "arm_definitions": args.arms(),
        "bases": {k: str(v) for k, v in bases.items()},
        "build": build,
        "size": size,
        "latency": latency,
        "memory": memory,
        "runs": runs,
        **aggregate(runs, args.seeds),
    }
    results["verdicts"] = verdicts(results)
    results["wall_time_s"] = time.perf_counter() - start
    out = Path(args.out)
    write_json_atomic(out / "bench_codesign.json", results)
    write_text_atomic(out / "bench_codesign.md", to_markdown(results))
    return results


def render(out: Path) -> dict:
    """The verdicts and the markdown again, from a saved bench_codesign.json."""
    path = out / "bench_codesign.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the benchmark first (without --render).")
    results = json.loads(path.read_text())
    results["verdicts"] = verdicts(results)
    write_json_atomic(path, results)
    write_text_atomic(out / "bench_codesign.md", to_markdown(results))
    return results


def main(argv=None):
    args = parse_args(BenchCodesignArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    print(to_markdown(render(Path(args.out)) if args.render else run(args)))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
