"""GGUF files of a BambaForCausalLM (hub_cards.gguf) against the fp32 transformers model: quality and CPU speed.

    python -m hybrid_mamba.eval_harness.bench_gguf --model BAMBA_FOLDER --gguf OUTDIR [--data data/demo]
                                                    [--out results/bench_gguf] [--threads 2] [--blocks 8]

Needs llama-cpp-python (`make gguf-install`). For every file in OUTDIR/gguf.json (f32, f16, q8_0,
q4_k_m), run by llama.cpp through llama_cpp.Llama (fp32 KV cache, so the file's weights are what is
measured), and for the --model folder in fp32 with eager attention (the pure-PyTorch path: transformers'
BambaForCausalLM, or our HybridMambaForCausalLM when --model is the folder the export came from):

- quality on --blocks held-out blocks of DATA/validation (packed token ids, each block read as one
  sequence from its first token): perplexity, the share of positions whose top-1 token is the fp32
  transformers model's (top1_agreement), and the largest logit difference to it (max_abs_logit_diff);
- file size;
- speed on --threads threads (torch.set_num_threads; llama.cpp n_threads and n_threads_batch): prefill
  tokens/s of a --prompt_tokens prompt, and decode tokens/s of --decode_tokens single-token steps
  after it (teacher-forced with held-out tokens, so every engine sees the same ids); median of --reps
  repetitions in which the engines take turns.

Writes bench_gguf.json (every number, the machine, the command) and bench_gguf.md into --out and
prints the table. On the tiny test model it takes 1-2 minutes on 2 busy cores; a random tiny model's
perplexity is about its vocabulary size, so there the columns to read are agreement and speed.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.files import write_json_atomic, write_text_atomic
from hybrid_mamba.common.machine import machine
from hybrid_mamba.eval_harness.bench_speed import cache_arg, returned_cache, timed
from hybrid_mamba.hub_cards.gguf import import_llama_cpp

logger = logging.getLogger(__name__)

GGML_TYPE_F32 = 0  # ggml_type of the KV cache


@dataclass
class GGUFBenchArgs:
    model: str = field(
        metadata={
            "help": "The BambaForCausalLM folder the GGUF files were exported from, or the hybrid_mamba folder that "
            "export was made from (same logits; the torch row then times our own PyTorch path)."
        }
    )
    gguf: str = field(metadata={"help": "The output folder of hub_cards.gguf (gguf.json and the .gguf files)."})
    data: str = field(
        default="data/demo", metadata={"help": "A data_scripts output folder: held-out text from DATA/validation."}
    )
    out: str = field(default="results/bench_gguf", metadata={"help": "Folder for bench_gguf.json and bench_gguf.md."})
    threads: int = field(default=2, metadata={"help": "CPU threads of both engines."})
    blocks: int = field(default=8, metadata={"help": "Held-out blocks for perplexity and agreement."})
    prompt_tokens: int = field(default=128, metadata={"help": "Prompt length of the prefill measurement."})
    decode_tokens: int = field(default=32, metadata={"help": "Single-token decode steps after the prompt."})
    reps: int = field(default=5, metadata={"help": "Speed repetitions (medians are reported)."})

    def __post_init__(self):
        for name in ("threads", "blocks", "prompt_tokens", "decode_tokens", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")


def load_llama(path: Path, n_ctx: int, threads: int, logits_all: bool):
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )


def llama_logits(llm, ids: list[int], vocab: int) -> np.ndarray:
    """(T, vocab) logits of llama.cpp for `ids` from an empty state; columns past `vocab` (the converter's padding) dropped."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids), :vocab], dtype=np.float64)


@torch.no_grad()
def torch_logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()


def quality(logits: list[np.ndarray], blocks: list[list[int]], reference: list[np.ndarray] | None) -> dict:
    """Perplexity of next-token prediction over all blocks; top-1 agreement and max |diff| against `reference`."""
    nll, n, agree, max_diff = 0.0, 0, 0, 0.0
    for i, (lg, ids) in enumerate(zip(logits, blocks)):
        shifted = lg[:-1] - lg[:-1].max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
        if reference is not None:
            agree += int((lg.argmax(-1) == reference[i].argmax(-1)).sum())
            max_diff = max(max_diff, float(np.abs(lg - reference[i]).max()))
    positions = sum(len(b) for b in blocks)
    out = {"perplexity": float(np.exp(nll / n)), "tokens": n}
    if reference is not None:
        out.update(top1_agreement=agree / positions, max_abs_logit_diff=max_diff)
    return out


def held_out(data: Path, n_blocks: int, vocab: int) -> list[list[int]]:
    from datasets import load_from_disk

    if not (data / "validation").is_dir():
        raise FileNotFoundError(
            f"{data / 'validation'} does not exist: pass --data, a data_scripts output folder (`make demo` writes data/demo)."
        )
    rows = load_from_disk(str(data / "validation"))
    blocks = [list(r["input_ids"]) for r in rows.select(range(min(n_blocks, len(rows))))]
    top = max(max(b) for b in blocks)
    if top >= vocab:
        raise ValueError(
            f"{data} holds token id {top}, past the model's vocabulary of {vocab}: not its tokenizer's data."
        )
    return blocks


@torch.no_grad()
def measure_speed(model, llamas: dict, prompt: list[int], steps: list[int], reps: int) -> dict:
    """Median prefill and decode tokens/s of transformers ("torch") and of each llama.cpp file, taking turns."""
    arg = cache_arg(model)
    times = {name: {"prefill": [], "decode": []} for name in ("torch", *llamas)}

    def torch_run():
        cache = {}
        ids = torch.tensor([prompt])
        t_pre = timed(lambda: cache.update(c=returned_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))))

        def decode():
            for i, tok in enumerate(steps):
                # position_ids given: Bamba does not derive them from the cache
                out = model(
                    input_ids=torch.tensor([[tok]]),
                    position_ids=torch.tensor([[len(prompt) + i]]),
                    use_cache=True,
                    **{arg: cache["c"]},
                )
                cache["c"] = returned_cache(out)

        return t_pre, timed(decode)

    def llama_run(llm):
        llm.reset()
        t_pre = timed(lambda: llm.eval(prompt))
        return t_pre, timed(lambda: [llm.eval([tok]) for tok in steps])

    runs = {"torch": torch_run, **{name: (lambda llm=llm: llama_run(llm)) for name, llm in llamas.items()}}
    for run in runs.values():  # warmup
        run()
    for _ in range(reps):
        for name, run in runs.items():
            t_pre, t_dec = run()
            times[name]["prefill"].append(t_pre)
            times[name]["decode"].append(t_dec)
    return {
        name: {
            "prefill_tokens_per_s": len(prompt) / statistics.median(t["prefill"]),
            "decode_tokens_per_s": len(steps) / statistics.median(t["decode"]),
            "prefill_s": t["prefill"],
            "decode_s": t["decode"],
        }
        for name, t in times.items()
    }


def to_markdown(results: dict) -> str:
    m, s = results["machine"], results["setup"]
    lines = [
        "# GGUF (llama.cpp) against transformers fp32",
        "",
        f"`{results['command']}` on {m['cpu']}, {m['threads']} threads, llama-cpp-python {m['llama_cpp_python']},"
        f" torch {m['torch']}, transformers {m['transformers']}, {m['date']}, commit {m['git_commit']}.",
        f"Quality on {s['blocks']} held-out blocks ({s['quality_tokens']} predicted tokens) of {s['data']}; top-1"
        f" agreement and max |logit diff| against transformers fp32. Speed: prefill of {s['prompt_tokens']} tokens,"
        f" then {s['decode_tokens']} decode steps, median of {s['reps']}; llama.cpp with an fp32 KV cache,"
        " transformers eager fp32.",
        "",
        "| engine | file size (MB) | perplexity | top-1 agreement | max abs logit diff | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["engines"].items():
        size = f"{r['bytes'] / 1e6:.3f}" if "bytes" in r else "-"
        agree = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "(reference)"
        diff = f"{r['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in r else "-"
        lines.append(
            f"| {name} | {size} | {r['perplexity']:.3f} | {agree} | {diff} |"
            f" {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(GGUFBenchArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dir, gguf_dir = Path(args.model), Path(args.gguf)
    manifest_path = gguf_dir / "gguf.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: --gguf takes the output folder of hub_cards.gguf.")
    import_llama_cpp()
    from transformers import AutoModelForCausalLM

    manifest = json.loads(manifest_path.read_text())
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", trust_remote_code=True
    ).eval()
    logger.info("torch fp32 reference: %s from %s", type(model).__name__, model_dir)
    vocab = model.config.vocab_size
    blocks = held_out(Path(args.data), args.blocks, vocab)
    stream = [t for b in blocks for t in b]
    need = args.prompt_tokens + args.decode_tokens
    stream = (stream * (need // len(stream) + 1))[:need]
    prompt, steps = stream[: args.prompt_tokens], stream[args.prompt_tokens :]

    reference = [torch_logits(model, b) for b in blocks]
    engines = {"torch fp32": quality(reference, blocks, None)}
    llamas = {}
    n_ctx = max(need, max(len(b) for b in blocks))
    for gguf_type, f in manifest["files"].items():
        path = gguf_dir / f["file"]
        llm = load_llama(path, n_ctx, args.threads, logits_all=True)
        engines[gguf_type] = {"file": f["file"], "bytes": path.stat().st_size}
        engines[gguf_type].update(quality([llama_logits(llm, b, vocab) for b in blocks], blocks, reference))
        llm.close()
        llamas[gguf_type] = load_llama(path, n_ctx, args.threads, logits_all=False)
        logger.info("%s: %s", gguf_type, {k: v for k, v in engines[gguf_type].items() if k != "file"})
    speed = measure_speed(model, llamas, prompt, steps, args.reps)
    for llm in llamas.values():
        llm.close()
    engines["torch fp32"].update(speed.pop("torch"))
    for gguf_type, r in speed.items():
        engines[gguf_type].update(r)
    info = machine(args.threads)
    info["llama_cpp_python"] = manifest["llama_cpp_python"]
    results = {
        "command": " ".join(
            ["python -m hybrid_mamba.eval_harness.bench_gguf", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": info,
        "setup": {
            "model": str(model_dir),
            "gguf": str(gguf_dir),
            "data": str(args.data),
            "blocks": len(blocks),
            "quality_tokens": sum(len(b) - 1 for b in blocks),
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "reps": args.reps,
            "pre_tokenizer": manifest.get("pre_tokenizer"),
        },
        "engines": engines,
    }
    out = Path(args.out)
    write_json_atomic(out / "bench_gguf.json", results)
    write_text_atomic(out / "bench_gguf.md", to_markdown(results) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
