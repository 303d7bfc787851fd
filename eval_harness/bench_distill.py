"""Distilled hybrid against the same hybrid trained from scratch, on the demo corpus, on CPU.

    python -m hybrid_mamba.eval_harness.bench_distill --out docs/results/bench_distill [--data_dir data/demo]

1. Teacher: a small all-attention model pretrained on DATA/ (trainers/pretrain.py) for `teacher_steps`.
2. Students, all with the same hybrid layout (the teacher's layers but `attention_layers` as Mamba-2), each
   trained for `student_steps` (the same tokens) through the same loop:
   - `distilled`: initialised from the teacher by modeling/distill_init.py (q/k/v/o -> C/B/x/out_proj),
     trained on KL(teacher || student) (trainers/distill.py);
   - `distilled, random mixers`: the same, but its Mamba-2 mixers freshly initialised (the other weights
     still the teacher's): what the attention-weight initialisation itself brings;
   - `scratch`: random init, next-token loss (trainers/pretrain.py);
   - `scratch, teacher + student tokens`: the same for `teacher_steps + student_steps`, so that it has seen
     as many tokens as the teacher and its distilled student together.
3. Every model (and the two students before training) on the first `val_blocks` validation blocks: next-token
   loss and KL to the teacher, in one pass; decode latency per token at batch 1 after prompts of
   `decode_prompts` tokens (eval_harness/bench_speed.py's `measure_decode`).

4. After all training, the trained models' final/ folders (teacher, the three students, scratch_long) on
   the offline held-out lm-eval tasks of eval_harness/tasks/hybrid_mamba (`demo_heldout_ppl`: word and
   byte perplexity, bits per byte; `demo_heldout_mc`: four-way continuation accuracy), one
   `lm_eval.simple_evaluate` per model and task through eval_harness/sweep.py (HFLM with remote code,
   the repo's task folder, all seeds set to `seed`); lm-eval's own standard errors are kept.

Writes bench_distill.json and bench_distill.md into --out; the runs go to --work_dir. A full run does all
four steps. `--rescore true` does step 4 alone: it reads --out's bench_distill.json, scores the final/
folders under --work_dir that exist, and rewrites the JSON (key `lm_eval`) and the markdown with the
held-out table added, everything else as it was. Sized to finish in about 20 minutes on 2 cores with 1
thread (the default), plus a few minutes of lm-eval; the machine it ran on is recorded.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import hybrid_mamba.modeling  # noqa: F401
from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.lm_eval_results import metric_values
from hybrid_mamba.common.machine import machine
from hybrid_mamba.eval_harness import sweep
from hybrid_mamba.eval_harness.bench_speed import Plan, measure_decode
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.distill_init import distill_init, parse_layers, student_config
from hybrid_mamba.trainers import distill, pretrain
from hybrid_mamba.trainers.data import collate_packed, load_packed

logger = logging.getLogger("hybrid_mamba.eval_harness.bench_distill")


@dataclass
class BenchDistillArgs:
    """Teacher, distilled hybrid and scratch hybrid at equal tokens: validation loss, KL, decode latency."""

    out: str = field(default="docs/results/bench_distill", metadata={"help": "Folder of the JSON and markdown."})
    data_dir: str = field(default="data/demo", metadata={"help": "DATA/ folder (make demo's data step)."})
    work_dir: str = field(default="runs/bench_distill", metadata={"help": "Folder of the training runs."})
    hidden_size: int = field(default=128, metadata={"help": "Teacher width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Teacher depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Teacher query heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Teacher key/value heads."})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width."})
    attention_layers: str = field(default="2", metadata={"help": "Layers the students keep as attention (1,3)."})
    micro_batch_size: int = field(default=4, metadata={"help": "Blocks per step (of DATA's block length)."})
    teacher_steps: int = field(default=150, metadata={"help": "Teacher pretraining steps."})
    student_steps: int = field(default=50, metadata={"help": "Training steps of every student."})
    teacher_lr: float = field(default=3e-3, metadata={"help": "Teacher peak learning rate."})
    student_lr: float = field(default=2e-3, metadata={"help": "Peak learning rate of every student run."})
    kl_weight: float = field(default=1.0, metadata={"help": "Distillation: weight of the KL."})
    lm_weight: float = field(default=0.0, metadata={"help": "Distillation: weight of the next-token loss."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation: softmax temperature."})
    long_scratch: bool = field(default=True, metadata={"help": "Also train scratch for teacher_steps + student_steps."})
    val_blocks: int = field(default=48, metadata={"help": "Validation blocks of the final evaluation."})
    decode_prompts: str = field(default="128,1024", metadata={"help": "Prompt lengths of the decode latency."})
    decode_steps: int = field(default=24, metadata={"help": "Timed decode steps per prompt length."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    seed: int = field(default=0, metadata={"help": "Seed of inits and data order, and lm-eval's seeds."})
    lm_eval_batch_size: int = field(default=4, metadata={"help": "lm-eval batch size of the held-out tasks."})
    lm_eval_limit: float | None = field(
        default=None, metadata={"help": "lm-eval --limit of the held-out tasks (all documents when unset)."}
    )
    rescore: bool = field(
        default=False,
        metadata={"help": "Only the held-out lm-eval tasks: add them to --out's JSON and markdown, no training."},
    )

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}.")
        if self.lm_eval_batch_size < 1:
            raise ValueError(f"--lm_eval_batch_size must be at least 1, got {self.lm_eval_batch_size}.")
        if self.teacher_steps < 1 or self.student_steps < 1:
            raise ValueError("--teacher_steps and --student_steps must be at least 1.")


def _train_fields(args: BenchDistillArgs, name: str, steps: int, lr: float) -> list[str]:
    fields = {
        "data_dir": args.data_dir,
        "output_dir": Path(args.work_dir) / name,
        "micro_batch_size": args.micro_batch_size,
        "max_steps": steps,
        "warmup_steps": max(1, steps // 10),
        "learning_rate": lr,
        "eval_every": max(1, steps // 4),
        "eval_batches": 8,
        "checkpoint_every": 10**9,
        "log_every": max(1, steps // 10),
        "seed": args.seed,
        "resume": False,
    }
    return [f"--{k}={v}" for k, v in fields.items()]


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    return [{k: r[k] for k in ("step", "val_loss", "val_kl") if k in r} for r in rows if "val_loss" in r]


def _save_init(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def evaluate_all(models: dict, teacher, val_ds, blocks: int, batch: int) -> dict:
    """Next-token loss and KL to the teacher of every model, over the first `blocks` validation blocks."""
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in models}
    n_ce = n_kl = 0
    for start in range(0, min(blocks, len(val_ds)), batch):
        rows = [val_ds[i] for i in range(start, min(start + batch, blocks, len(val_ds)))]
        b = collate_packed(rows)
        inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False}
        target = teacher(**inputs).logits
        labels = b["labels"][:, 1:]
        for name, m in models.items():
            logits = target if m is teacher else m(**inputs).logits
            ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="sum")
            sums[name]["ce"] += ce.item()
            sums[name]["kl"] += distill.kl_per_token(logits, target).sum().item()
        n_ce += labels.numel()
        n_kl += b["input_ids"].numel()
    return {name: {"val_loss": s["ce"] / n_ce, "val_kl": s["kl"] / n_kl} for name, s in sums.items()}


def run(args: BenchDistillArgs) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    train_ds, val_ds, tokenizer = load_packed(args.data_dir)  # fails before any work on a bad DATA/
    seq_len = int(train_ds[0]["input_ids"].shape[-1])
    tokens_per_step = args.micro_batch_size * seq_len
    keep = parse_layers(args.attention_layers)
    timings = {}

    # 1. the teacher
    t0 = time.perf_counter()
    overrides = {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "intermediate_size": args.intermediate_size,
        "layer_types": ["attention"] * args.num_hidden_layers,
        "max_position_embeddings": 4096,
    }
    import yaml

    overrides_arg = "--model_overrides=" + yaml.safe_dump(overrides, default_flow_style=True).strip()
    teacher_summary = pretrain.main(
        [*_train_fields(args, "teacher", args.teacher_steps, args.teacher_lr), "--model_preset=tiny", overrides_arg]
    )
    timings["teacher_train_s"] = time.perf_counter() - t0
    teacher_dir = work / "teacher" / "final"
    teacher = HybridMambaForCausalLM.from_pretrained(teacher_dir).eval()

    # 2. the students' inits
    torch.manual_seed(args.seed)
    distilled_init = distill_init(teacher, keep, seed=args.seed)
    fresh = HybridMambaForCausalLM(student_config(teacher.config, keep))  # seeded by distill_init's seed
    random_mixers = distill_init(teacher, keep, seed=args.seed)
    with torch.no_grad():
        fresh_sd = fresh.state_dict()
        for k, v in random_mixers.state_dict().items():
            if ".mamba." in k:
                v.copy_(fresh_sd[k])
    inits = {
        "distilled": _save_init(distilled_init, tokenizer, work / "init_distilled"),
        "distilled_random_mixers": _save_init(random_mixers, tokenizer, work / "init_random_mixers"),
        "scratch": _save_init(fresh, tokenizer, work / "init_scratch"),
    }

    # 3. the students' training, each for the same tokens
    distill_fields = [
        f"--teacher={teacher_dir}",
        f"--kl_weight={args.kl_weight}",
        f"--lm_weight={args.lm_weight}",
        f"--temperature={args.temperature}",
    ]
    runs = {
        "distilled": ("distill", inits["distilled"], args.student_steps),
        "distilled_random_mixers": ("distill", inits["distilled_random_mixers"], args.student_steps),
        "scratch": ("pretrain", inits["scratch"], args.student_steps),
    }
    if args.long_scratch:
        runs["scratch_long"] = ("pretrain", inits["scratch"], args.teacher_steps + args.student_steps)
    summaries, curves = {}, {}
    for name, (kind, init, steps) in runs.items():
        t0 = time.perf_counter()
        fields = _train_fields(args, name, steps, args.student_lr)
        if kind == "distill":
            summaries[name] = distill.main([*fields, f"--student={init}", *distill_fields])
        else:
            summaries[name] = pretrain.main([*fields, f"--init_from={init}"])
        timings[f"{name}_train_s"] = time.perf_counter() - t0
        curves[name] = _curve(work / name)

    # 4. evaluation of every model against the same validation blocks and the same teacher
    models = {"teacher": teacher}
    models.update({f"{name}@init": HybridMambaForCausalLM.from_pretrained(inits[name]).eval() for name in inits})
    models.update({name: HybridMambaForCausalLM.from_pretrained(work / name / "final").eval() for name in runs})
    t0 = time.perf_counter()
    evals = evaluate_all(models, teacher, val_ds, args.val_blocks, args.micro_batch_size)
    timings["evaluation_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = Plan(
        decode_prompts=tuple(int(x) for x in args.decode_prompts.split(",") if x),
        decode_steps=args.decode_steps,
        decode_warmup=3,
    )
    decode = measure_decode({"teacher": teacher, "hybrid": models["distilled"]}, plan, args.seed)
    timings["decode_s"] = time.perf_counter() - t0

    tokens = {name: summaries[name]["tokens_seen"] for name in runs}
    tokens["teacher"] = teacher_summary["tokens_seen"]
    rows = []
    for name, e in evals.items():
        base = name.split("@")[0]
        trained = "@init" not in name
        rows.append(
            {
                "model": name,
                "layer_types": models[name].config.layer_types,
                "parameters": sum(p.numel() for p in models[name].parameters()),
                "training_tokens": tokens.get(base, 0) if trained else 0,
                "tokens_incl_teacher": (tokens["teacher"] if base.startswith("distilled") else 0)
                + (tokens.get(base, 0) if trained else 0),
                **e,
            }
        )
    return {
        "args": asdict(args),
        "machine": machine(args.threads),
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "unigram_baseline_val_loss": teacher_summary.get("unigram_baseline_val_loss"),
        "rows": rows,
        "curves": curves,
        "decode_ms_per_token": {
            prompt: {name: r["p50_s"] * 1e3 for name, r in by_model.items()} for prompt, by_model in decode.items()
        },
        "decode": decode,
        "timings_s": timings,
    }


def held_out_scores(folders: dict[str, Path], args: BenchDistillArgs) -> dict:
    """The offline held-out lm-eval tasks (sweep's `offline` suite) on every model folder, one seed.

    Returns {"tasks", "skipped_tasks", "errors", "models": {name: {task: {metric: {"value", "stderr",
    "higher_is_better"}}}}, "documents": {task: n}, settings, machine, wall_s}. A task that cannot be built,
    a folder that does not load and a run that fails are recorded and the rest go on, as in the sweep.
    """
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    sargs = sweep.SweepArgs(
        models=[str(f) for f in folders.values()],
        tasks=["offline"],
        seeds=[args.seed],
        limit=args.lm_eval_limit,
        batch_size=args.lm_eval_batch_size,
        device="cpu",
    )
    tasks, skipped = sweep.check_tasks(sweep.expand_tasks(sargs.tasks), sargs.include_path)
    tm = TaskManager(include_path=sargs.include_path)
    scores, documents, errors = {}, {}, []
    for name, folder in folders.items():
        try:
            lm = sweep.load_model(str(folder), sargs)
        except Exception as e:
            errors.append({"model": name, "task": None, "error": f"model does not load: {type(e).__name__}: {e}"})
            continue
        for task in tasks:
            logger.info("lm-eval: %s / %s", name, task)
            try:
                res = sweep.run_cell(lm, task, args.seed, sargs, tm)
            except Exception as e:
                errors.append({"model": name, "task": task, "error": f"{type(e).__name__}: {e}"})
                logger.error("lm-eval failed: %s / %s: %s", name, task, e)
                continue
            better = res.get("higher_is_better", {})
            for t, metrics in metric_values(res).items():
                for metric, (value, stderr) in metrics.items():
                    scores.setdefault(name, {}).setdefault(t, {})[metric] = {
                        "value": value,
                        "stderr": stderr,
                        "higher_is_better": better.get(t, {}).get(metric.split(" (")[0]),
                    }
            for t, n in (res.get("n-samples") or {}).items():
                documents[t] = n.get("effective")
        del lm
    return {
        "tasks": tasks,
        "skipped_tasks": skipped,
        "errors": errors,
        "folders": {name: str(f) for name, f in folders.items()},
        "models": scores,
        "documents": documents,
        "seed": args.seed,
        "limit": args.lm_eval_limit,
        "num_fewshot": None,
        "batch_size": args.lm_eval_batch_size,
        "include_path": sargs.include_path,
        "rescore": args.rescore,
        "out": args.out,
        "machine": machine(args.threads, libraries=("torch", "transformers", "lm_eval")),
        "wall_s": time.perf_counter() - t0,
    }


def trained_folders(results: dict, work_dir: str) -> dict[str, Path]:
    """The final/ folder of the teacher and of every trained student of `results`, where it exists."""
    names = ["teacher", *results["curves"]]
    folders = {name: Path(work_dir) / name / "final" for name in names}
    missing = [name for name, f in folders.items() if not (f / "config.json").is_file()]
    if len(missing) == len(folders):
        raise FileNotFoundError(f"no final/ model folder under {work_dir} (expected {', '.join(names)})")
    for name in missing:
        logger.warning("no %s: not scored", folders.pop(name) / "config.json")
    return folders


def _lm_eval_cell(s: dict | None) -> str:
    if s is None or s["value"] is None:
        return "-"
    v = f"{s['value']:,.0f}" if abs(s["value"]) >= 1e4 else f"{s['value']:.3f}"
    return v if s["stderr"] is None else f"{v} ± {s['stderr']:.3f}"


def lm_eval_markdown(ev: dict) -> list[str]:
    """The held-out lm-eval section: rows (task, metric), one column per model."""
    models = list(ev["folders"])
    rows = list(dict.fromkeys((t, m) for mod in ev["models"].values() for t, ms in mod.items() for m in ms))
    docs = ev["documents"]
    m = ev["machine"]
    limit = f", --limit {ev['limit']:g}" if ev["limit"] is not None else ""
    lines = [
        "## Held-out lm-eval tasks",
        "",
        f"The final/ folder of every trained model on the offline tasks of `eval_harness/tasks/hybrid_mamba` "
        f"(lm-eval {m.get('lm_eval', '?')}, HFLM, zero-shot, seed {ev['seed']}, batch size {ev['batch_size']}"
        f"{limit}; {m.get('cpu', '?')}, {m.get('threads', '?')} thread(s), {m.get('date', '?')}). "
        f"`demo_heldout_ppl`: {docs.get('demo_heldout_ppl', '?')} held-out text pieces scored whole "
        "(loglikelihood_rolling); `demo_heldout_mc`: "
        f"{docs.get('demo_heldout_mc', '?')} four-way choices of a passage's next lines (chance 0.25), "
        "acc_norm normalised by the choice's length in bytes. Both are built by `eval_harness/build_tasks.py` "
        "from the validation split of data/demo, which no run trained on. ± is lm-eval's standard error "
        "(none for perplexities); ↓ lower is better, ↑ higher is better."
        + (
            " Added to the run above later, by `python -m hybrid_mamba.eval_harness.bench_distill --out "
            f"{ev['out']} --rescore true`."
            if ev["rescore"]
            else ""
        ),
        "",
        "| task | metric | " + " | ".join(models) + " |",
        "|---|---|" + "---:|" * len(models),
    ]
    for task, metric in rows:
        better = next(
            (
                ev["models"][mod][task][metric]["higher_is_better"]
                for mod in ev["models"]
                if metric in ev["models"][mod].get(task, {})
            ),
            None,
        )
        arrow = {True: " ↑", False: " ↓"}.get(better, "")
        cells = [_lm_eval_cell(ev["models"].get(mod, {}).get(task, {}).get(metric)) for mod in models]
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + " |")
    if ev["skipped_tasks"]:
        lines += ["", "Tasks not run:", *(f"- {t}: {why}" for t, why in ev["skipped_tasks"].items())]
    if ev["errors"]:
        lines += ["", "Failed:", *(f"- {e['model']} / {e['task'] or 'all tasks'}: {e['error']}" for e in ev["errors"])]
    return lines


def to_markdown(results: dict) -> str:
    a, m = results["args"], results["machine"]
    lines = [
        "# Distilling an all-attention teacher into a hybrid (demo corpus, CPU)",
        "",
        f"Machine: {m.get('cpu', '?')}, {a['threads']} thread(s); shared and noisy (other jobs ran at the same "
        "time), so the timings are indicative. Command: `python -m hybrid_mamba.eval_harness.bench_distill "
        f"--out {a['out']}`.",
        "",
        f"Teacher: {a['num_hidden_layers']} attention layers, hidden {a['hidden_size']}, "
        f"{a['num_attention_heads']} query / {a['num_key_value_heads']} key-value heads, pretrained "
        f"{a['teacher_steps']} steps. Students: layers {a['attention_layers']} kept as attention, the others "
        f"Mamba-2; {a['student_steps']} steps each ({a['student_steps'] * results['tokens_per_step']:,} tokens), "
        f"learning rate {a['student_lr']}. Distillation: {a['kl_weight']} x KL (T = {a['temperature']}) + "
        f"{a['lm_weight']} x LM. Validation: the first {a['val_blocks']} blocks of {results['seq_len']} tokens; "
        f"unigram baseline {results['unigram_baseline_val_loss']:.3f} nats/token.",
        "",
        "| model | parameters | training tokens | tokens incl. the teacher's | val loss (nats/token) | KL to the teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['training_tokens']:,} | "
            f"{r['tokens_incl_teacher']:,} | {r['val_loss']:.3f} | {r['val_kl']:.3f} |"
        )
    lines += [
        "",
        "`@init`: before any student training. `distilled_random_mixers`: the teacher's weights except the "
        "Mamba-2 mixers, which start random. `scratch_long`: as many tokens as teacher + distillation together.",
        "",
    ]
    if "lm_eval" in results:
        lines += [*lm_eval_markdown(results["lm_eval"]), ""]
    lines += [
        "## Decode latency, batch 1 (ms per token, median)",
        "",
        "| prompt tokens | " + " | ".join(next(iter(results["decode_ms_per_token"].values()))) + " |",
        "|---:|" + "---:|" * len(next(iter(results["decode_ms_per_token"].values()))),
    ]
    for prompt, by_model in results["decode_ms_per_token"].items():
        lines.append(f"| {prompt} | " + " | ".join(f"{v:.2f}" for v in by_model.values()) + " |")
    lines += [
        "",
        "## Validation loss during training (8 batches per point)",
        "",
        "| run | validation loss at step (KL to the teacher for distillation runs) |",
        "|---|---|",
    ]
    for name, curve in results["curves"].items():
        points = [
            f"{p['step']}: {p['val_loss']:.3f}" + (f" ({p['val_kl']:.3f})" if "val_kl" in p else "") for p in curve
        ]
        lines.append(f"| {name} | " + ", ".join(points) + " |")
    t = results["timings_s"]
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + " (seconds)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(BenchDistillArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not math.isfinite(args.student_lr):
        raise ValueError("--student_lr must be finite.")
    out = Path(args.out)
    if args.rescore:
        torch.set_num_threads(args.threads)
        if not (out / "bench_distill.json").is_file():
            raise FileNotFoundError(f"{out / 'bench_distill.json'} not found: --rescore needs a full run's results")
        results = json.loads((out / "bench_distill.json").read_text())
        results["lm_eval"] = held_out_scores(trained_folders(results, args.work_dir), args)
    else:
        t0 = time.perf_counter()
        results = run(args)
        # after every training run: scores the final/ folders the runs just wrote
        results["lm_eval"] = held_out_scores(trained_folders(results, args.work_dir), args)
        results["timings_s"]["total_s"] = time.perf_counter() - t0
    write_json_atomic(out / "bench_distill.json", results)
    md = to_markdown(results)
    write_text_atomic(out / "bench_distill.md", md)
    print(md)
    return results


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
