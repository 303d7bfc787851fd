"""lm-eval on a tiny saved model with the offline tasks (CLI and simple_evaluate agree, no repo code
imported by the CLI run), the sweep's resume after an interruption, and its aggregation math."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from transformers import AutoTokenizer

from hybrid_mamba.common.stats import summarize
from hybrid_mamba.eval_harness import sweep as sweep_mod
from hybrid_mamba.eval_harness.sweep import TASKS_DIR, SweepArgs, aggregate
from hybrid_mamba.modeling import HybridMambaForCausalLM

TASKS = "demo_heldout_ppl,demo_heldout_mc"
# Run lm-eval's CLI, then fail if any module of this repository was imported on the way.
CLI_GUARD = """
import sys
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
ours = sorted(m for m in sys.modules if m.split(".")[0] in {"hybrid_mamba", "common", "configuration", "modeling", "trainers", "data_scripts", "eval_harness", "hub_cards"})
assert not ours, f"repository modules imported: {ours}"
"""


@pytest.fixture(scope="module")
def tiny_model(tiny_data, tmp_path_factory):
    """A save_pretrained folder with remote code and the tiny tokenizer, as the trainer writes."""
    folder = tmp_path_factory.mktemp("model") / "final"
    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    model = HybridMambaForCausalLM(tiny_config("hybrid", vocab_size=len(tok), max_position_embeddings=4096))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def _metrics(results: dict) -> dict:
    return {(t, k): v for t, ms in results["results"].items() for k, v in ms.items() if isinstance(v, float)}


@pytest.mark.slow
def test_cli_and_simple_evaluate_agree_on_offline_tasks(tiny_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-c",
        CLI_GUARD,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_model},trust_remote_code=True",
        "--tasks",
        TASKS,
        "--include_path",
        str(TASKS_DIR),
        "--device",
        "cpu",
        "--limit",
        "3",
        "--batch_size",
        "2",
        "--output_path",
        str(out),
    ]
    # run from an empty folder: the task loaders find their data from their own location
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = out.rglob("results_*.json")
    cli = json.loads(written.read_text())

    api = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model},trust_remote_code=True",
        tasks=TASKS.split(","),
        device="cpu",
        limit=3,
        batch_size=2,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )
    a, b = _metrics(cli), _metrics(api)
    assert {"bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"} <= {
        k for t, k in a if t == "demo_heldout_ppl"
    }
    assert {"acc,none", "acc_norm,none"} <= {k for t, k in a if t == "demo_heldout_mc"}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    # an untrained model over a 300-token vocabulary: near-uniform, so well above 1 bit per byte
    assert a[("demo_heldout_ppl", "bits_per_byte,none")] > 1.0
    # documents scored under --limit, as every supported lm-eval release records them (and hub_cards reads them)
    assert cli["n-samples"]["demo_heldout_mc"]["effective"] == 3


def test_sweep_resumes_after_interruption_and_reports_bad_cells(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real_run_cell = sweep_mod.run_cell
    calls = []

    def interrupted(lm, task, seed, args, tm):
        calls.append((task, seed))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second cell
        return real_run_cell(lm, task, seed, args, tm)

    args = SweepArgs(
        models=[str(tiny_model)], tasks=["demo_heldout_mc"], seeds=[0, 1], limit=2, batch_size=2, out=str(out)
    )
    monkeypatch.setattr(sweep_mod, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.sweep(args)
    done = sorted(out.rglob("seed*.json"))
    assert [p.name for p in done] == ["seed0.json"]
    assert not list(out.rglob(".seed*"))  # no half-written cell
    first = json.loads(done[0].read_text())
    assert first["config"]["fewshot_seed"] == 0 and first["config"]["limit"] == 2
    assert first["hybrid_mamba_sweep"] == {"limit": 2, "num_fewshot": None}

    calls.clear()
    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a: calls.append(a[1:3]) or real_run_cell(*a))
    args.models = [str(tiny_model), str(tmp_path / "missing")]
    args.tasks = ["demo_heldout_mc", "no_such_task"]
    summary = sweep_mod.sweep(args)
    assert calls == [("demo_heldout_mc", 1)]  # only the unfinished cell ran again
    assert json.loads(done[0].read_text()) == first
    # a cell run with another --limit or --num_fewshot is not reused
    assert sweep_mod.load_cell(done[0], args) is not None
    assert sweep_mod.load_cell(done[0], SweepArgs(models=[], tasks=[], limit=3)) is None
    assert sweep_mod.load_cell(done[0], SweepArgs(models=[], tasks=[], limit=2, num_fewshot=1)) is None
    assert "no_such_task" in summary["skipped_tasks"]
    assert [(e["model"], e["seed"]) for e in summary["errors"]] == [
        (str(tmp_path / "missing"), 0),
        (str(tmp_path / "missing"), 1),
    ]
    assert "does not load" in summary["errors"][0]["error"]
    acc = json.loads((out / "results.json").read_text())["results"][str(tiny_model)]["demo_heldout_mc"]["acc"]
    assert acc["n"] == 2 and acc["seeds"] == [0, 1]
    assert "no_such_task" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0


def test_summary_statistics_match_hand_computed_values():
    s = summarize([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(7 / 3))  # ((16 + 1 + 25) / 9) / 2
    assert s["stderr"] == pytest.approx(math.sqrt(7 / 9))
    half = 4.302652729911275 * math.sqrt(7 / 9)  # t(0.975, df=2)
    assert s["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    one = summarize([0.5])
    assert one["mean"] == 0.5 and one["stderr"] is None and one["ci95"] is None


def test_aggregate_reads_lm_eval_results():
    def res(acc, ppl):
        return {
            "results": {
                "t": {"alias": "t", "acc,none": acc, "acc_stderr,none": 0.1, "ppl,none": ppl, "ppl_stderr,none": "N/A"}
            }
        }

    agg = aggregate({("m", "t", 0): res(0.25, 10.0), ("m", "t", 1): res(0.75, 12.0)})
    acc, ppl = agg["m"]["t"]["acc"], agg["m"]["t"]["ppl"]
    assert set(agg["m"]["t"]) == {"acc", "ppl"}
    assert acc["values"] == [0.25, 0.75] and acc["mean"] == 0.5 and acc["lm_eval_stderr"] == [0.1, 0.1]
    assert acc["stderr"] == pytest.approx(0.25)  # std sqrt(0.125) / sqrt(2)
    assert acc["ci95"] == pytest.approx([0.5 - 12.706204736174707 * 0.25, 0.5 + 12.706204736174707 * 0.25])
    assert ppl["mean"] == 11.0 and ppl["lm_eval_stderr"] == [None, None]


def _multiline_data(root: Path) -> tuple[Path, list[str]]:
    """A DATA/ folder whose held-out documents have many lines: one document per block, two sources."""
    import random

    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(10)) for _ in range(24)]
    # the full byte alphabet, so that newlines survive a decode
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    rows = []
    for i, d in enumerate(docs):
        ids = tok(d)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": ids, "position_ids": list(range(len(ids))), "source": (i // 4) % 2})
    Dataset.from_list(rows).save_to_disk(str(root / "validation"))
    tok.save_pretrained(root / "tokenizer")
    (root / "report.json").write_text(json.dumps({"sources": [{"name": "a"}, {"name": "b"}]}))
    return root, docs


def test_build_tasks_is_deterministic_and_continuations_follow_their_context(tmp_path):
    from hybrid_mamba.eval_harness.build_tasks import BuildArgs, build

    data, docs = _multiline_data(tmp_path / "data")
    kw = dict(data_dir=str(data), ppl_docs=4, mc_docs=6, min_chars=100, context_chars=60, continuation_chars=20)
    assert build(BuildArgs(out=str(tmp_path / "one"), **kw)) == {"heldout_ppl": 4, "heldout_mc": 6}
    build(BuildArgs(out=str(tmp_path / "two"), **kw))
    for name in ("heldout_ppl.jsonl", "heldout_mc.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()

    ppl = [json.loads(x) for x in (tmp_path / "one" / "heldout_ppl.jsonl").read_text().splitlines()]
    mc = [json.loads(x) for x in (tmp_path / "one" / "heldout_mc.jsonl").read_text().splitlines()]
    assert all(p["text"] in docs for p in ppl) and {p["source"] for p in ppl} == {"a", "b"}
    for item in mc:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        doc = next(d for d in docs if d.startswith(item["context"]))
        assert doc not in [p["text"] for p in ppl]  # the two tasks share no text
        assert doc.startswith(item["context"] + item["choices"][item["label"]])  # the true continuation
        for j, wrong in enumerate(item["choices"]):
            if j != item["label"]:
                assert not doc.startswith(item["context"] + wrong)

    with pytest.raises(ValueError, match="need 40"):
        build(BuildArgs(out=str(tmp_path / "three"), data_dir=str(data), ppl_docs=20, mc_docs=20, min_chars=100))
    with pytest.raises(FileNotFoundError, match="data_scripts.prepare"):
        build(BuildArgs(out=str(tmp_path / "four"), data_dir=str(tmp_path / "missing")))
