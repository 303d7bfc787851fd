"""Fine-tuning with peft on CPU: targets, gradients, merging, adapter save/load, chat masking,
malformed records, classification metrics and learning, rank allocation, offline GLUE."""

import copy
import json
import logging
import math

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from conftest import tiny_config
from peft import LoraConfig, PeftModel, get_peft_model

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.modeling import HybridMambaForCausalLM, HybridMambaForSequenceClassification
from hybrid_mamba.trainers import finetune
from hybrid_mamba.trainers.args import FinetuneArgs
from hybrid_mamba.trainers.chat_data import load_chat, read_chat_jsonl, tokenize_chat
from hybrid_mamba.trainers.cls_data import GLUE_TASKS, load_examples
from hybrid_mamba.trainers.collate import right_pad
from hybrid_mamba.trainers.demo_base import build_tokenizer
from hybrid_mamba.trainers.peft_targets import available_targets, resolve_targets, target_module_names
from hybrid_mamba.trainers.rank_allocation import (
    allocate_ranks,
    measure_importance,
    rank_and_alpha_patterns,
    uniform_budget,
)

ALL = [
    "mamba.dt_proj",
    "mamba.in_proj",
    "mamba.out_proj",
    "mamba.x_proj",
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A saved tiny hybrid (Mamba-2, attention, Mamba-1, Mamba-2) with a tokenizer and chat template."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = tiny_config(
        "hybrid",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    HybridMambaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_chat(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def chat_files(tmp_path):
    conv = [
        [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
        for a in range(6)
        for b in range(4)
    ]
    return write_chat(tmp_path / "train.jsonl", conv), write_chat(tmp_path / "val.jsonl", conv[:8])


def run_finetune(tmp_path, base, **overrides):
    cfg = {
        "base_model": str(base),
        "output_dir": str(tmp_path / "run"),
        "micro_batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 1,
        "learning_rate": 1e-2,
        "weight_decay": 0.0,
        "eval_every": 3,
        "checkpoint_every": 3,
        "log_every": 1,
        "lora_r": 4,
        "lora_alpha": 8,
        **overrides,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return finetune.main(["--config", str(path)])


# Targets


def test_default_targets_follow_the_layout():
    assert available_targets(HybridMambaForCausalLM(tiny_config("hybrid"))) == ALL
    assert available_targets(HybridMambaForCausalLM(tiny_config("mamba2", intermediate_size=0))) == [
        "mamba.in_proj",
        "mamba.out_proj",
    ]
    attn = HybridMambaForCausalLM(tiny_config("attention"))
    assert resolve_targets(attn, None) == [t for t in ALL if not t.startswith("mamba")]
    assert resolve_targets(attn, ["attention", "up_proj"]) == [
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]


def test_unknown_target_lists_the_available_ones():
    model = HybridMambaForCausalLM(tiny_config("mamba2"))
    with pytest.raises(
        ValueError,
        match=r"Unknown LoRA target\(s\) \['q_proj', 'mamba.x_proj'\].*Available targets: "
        r"mamba.in_proj, mamba.out_proj, mlp.down_proj.*groups: all, mamba, mlp",
    ):
        resolve_targets(model, ["q_proj", "in_proj", "mamba.x_proj"])


def test_every_target_module_receives_a_nonzero_gradient(tokenizer):
    # Wider init: at std 0.02 the scan's share of a Mamba output (and so dt_proj's gradient) is ~1e-8.
    model = HybridMambaForCausalLM(tiny_config("hybrid", initializer_range=0.3, vocab_size=len(tokenizer)))
    args = FinetuneArgs(base_model="unused", lora_r=4, lora_alpha=8)
    lora, info = finetune.wrap_with_lora(args, model, None, None)
    assert (
        info["targets"] == ALL and len(info["ranks"]) == 3 * 2 + 4 + 4 * 3 + 2
    )  # 3 Mamba (+x/dt on one), 1 attention, 4 MLPs
    ids = torch.randint(3, len(tokenizer), (2, 12))
    lora(input_ids=ids, labels=ids).loss.backward()
    per_module = {}
    for name, p in lora.named_parameters():
        if "lora_" in name:
            module = name.split(".lora_")[0]
            per_module[module] = per_module.get(module, 0.0) + (0.0 if p.grad is None else p.grad.abs().sum().item())
    assert len(per_module) == len(info["ranks"])
    assert all(g > 0 for g in per_module.values()), [m for m, g in per_module.items() if g == 0]


@pytest.mark.parametrize("cls", [HybridMambaForCausalLM, HybridMambaForSequenceClassification])
def test_merge_and_unload_matches_the_adapted_model(cls):
    model = cls(tiny_config("hybrid", num_labels=3, pad_token_id=0)).eval()
    task = "CAUSAL_LM" if cls is HybridMambaForCausalLM else "SEQ_CLS"
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, task_type=task)
    ).eval()
    ids = torch.randint(3, 512, (2, 11))
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with lora.disable_adapter():
            plain = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter matters
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


# Chat data


CHATML_WITH_GENERATION = (  # the form of data_scripts' tokenizer template
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [
        (None, "2 plus 3 is 5.</s>\nenots</s>\n"),  # spans from template prefixes: answer, end of turn, newline
        (CHATML_WITH_GENERATION, "2 plus 3 is 5.<|im_end|>enots<|im_end|>"),  # the template's {% generation %} marks
    ],
)
def test_chat_masking_puts_loss_only_on_assistant_tokens(tokenizer, template, expected):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template or tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "Reverse the word stone."},
        {"role": "assistant", "content": "enots"},
    ]
    row = tokenize_chat(tokenizer, messages, max_seq_len=512)
    ids, labels = row["input_ids"], row["labels"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    kept = [t for t, label in zip(ids, labels) if label != -100]
    assert all(label in (-100, t) for t, label in zip(ids, labels))
    assert tokenizer.decode(kept) == expected  # the answers and their end of turn, nothing else
    runs = "".join("a" if label != -100 else "." for label in labels)
    assert runs.count(".a") == 2  # two separate assistant spans
    # the model's loss is the mean over exactly those tokens
    batch = right_pad(tokenizer.pad_token_id)([{k: torch.tensor(v) for k, v in row.items()}])
    model = HybridMambaForCausalLM(tiny_config("hybrid", vocab_size=len(tokenizer)))
    with torch.no_grad():
        out = model(**batch)
    logits, target = out.logits[0, :-1], batch["labels"][0, 1:]
    keep = target != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, manual)


def test_malformed_chat_records_are_reported_with_file_and_line(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        "",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"text": "no messages"}),
        json.dumps(good),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, problems = read_chat_jsonl(path)
    assert [n for n, _ in records] == [1, 9]
    expected = {
        2: "invalid JSON",
        3: "has no 'role'",
        4: "empty or missing 'content'",
        5: "no assistant message",
        7: "role 'robot'",
        8: "'messages'",
    }
    assert len(problems) == len(expected)
    for (line, why), problem in zip(expected.items(), problems):
        assert problem.startswith(f"{path}:{line}: ") and why in problem, problem
    ds, problems = load_chat(path, tokenizer, max_seq_len=64)  # skips them, does not crash
    assert len(ds) == 2 and len(problems) == 6
    path.write_text("\n".join(lines[1:8]) + "\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        load_chat(path, tokenizer, max_seq_len=64)


# Adapters through the entry point


def test_lora_chat_run_saves_the_adapter_alone_and_it_loads_onto_the_base(tmp_path, base, tokenizer):
    train_file, val_file = chat_files(tmp_path)
    summary = run_finetune(tmp_path, base, task="chat", train_file=str(train_file), validation_file=str(val_file))
    final = tmp_path / "run" / "final"
    files = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "finetune_config.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert summary["finetune"]["lora_parameters"] == summary["finetune"]["lora_budget"]
    # round trip: base + saved adapter reproduces the run's final validation loss
    from hybrid_mamba.trainers.loop import evaluate

    model = PeftModel.from_pretrained(HybridMambaForCausalLM.from_pretrained(base), final)
    val_ds, _ = load_chat(val_file, tokenizer, 512)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=8, collate_fn=right_pad(tokenizer.pad_token_id))
    from accelerate import Accelerator

    val = evaluate(model, loader, Accelerator(cpu=True))
    assert val == pytest.approx(summary["final_val_loss"], abs=1e-5)
    assert not math.isclose(
        val, evaluate(HybridMambaForCausalLM.from_pretrained(base), loader, Accelerator(cpu=True)), abs_tol=1e-4
    )
    # and the merged folder (python -m hybrid_mamba.trainers.merge) is a plain model with the same outputs
    from hybrid_mamba.trainers.merge import merge

    merge(final, tmp_path / "merged")
    merged = HybridMambaForCausalLM.from_pretrained(tmp_path / "merged")
    assert evaluate(merged, loader, Accelerator(cpu=True)) == pytest.approx(val, abs=1e-5)


# Classification


def test_local_metric_module_loads_offline_and_matches_sklearn():
    from sklearn.metrics import f1_score, matthews_corrcoef

    from hybrid_mamba.trainers import metrics

    preds, refs = [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0]
    assert metrics.load("mrpc").compute(predictions=preds, references=refs) == {
        "accuracy": pytest.approx(4 / 6),
        "f1": pytest.approx(f1_score(refs, preds)),
    }
    assert metrics.load("cola").compute(predictions=preds, references=refs)["matthews_correlation"] == pytest.approx(
        matthews_corrcoef(refs, preds)
    )
    stsb = metrics.load("stsb").compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0.0, 1.0, 2.0, 3.0])
    assert stsb["spearmanr"] == pytest.approx(0.8) and 0.8 < stsb["pearson"] < 1
    assert set(metrics.load("classification").compute(predictions=preds, references=refs)) == {
        "accuracy",
        "f1",
        "matthews_correlation",
    }


def test_glue_from_the_hub_offline_says_so_and_uses_local_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = GLUE_TASKS["mrpc"]
    with pytest.raises(ConnectionError, match="offline or the Hub is unreachable.*data_source: local"):
        load_examples("mrpc", task, None, None, "hub")
    train = tmp_path / "train.tsv"
    train.write_text("sentence1\tsentence2\tlabel\na b\tc d\t1\nbad row\n\tempty\t0\ne f\tg h\t7\ni j\tk l\t0\n")
    with caplog.at_level(logging.WARNING):
        rows, val, problems = load_examples("mrpc", task, train, train, "auto")
    assert "HF_HUB_OFFLINE" in caplog.text and "using local files instead" in caplog.text
    assert [r["label"] for r in rows] == [1, 0]
    assert [p.split(": ")[0] for p in problems[:3]] == [f"{train}:3", f"{train}:4", f"{train}:5"]  # line numbers


def test_classification_finetune_learns_a_separable_toy_task(tmp_path, base):
    import random

    rng = random.Random(0)
    fillers = "the film the plot the cast was is felt very quite".split()

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            words = rng.sample(fillers, 3) + ["great" if label else "awful"] + rng.sample(fillers, 2)
            out.append(f"{' '.join(words)}\t{label}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    (tmp_path / "train.tsv").write_text(rows(256))
    (tmp_path / "val.tsv").write_text(rows(64))
    summary = run_finetune(
        tmp_path,
        base,
        task="classification",
        classification_task="toy",
        text_columns=["sentence"],
        num_labels=2,
        data_source="local",
        train_file=str(tmp_path / "train.tsv"),
        validation_file=str(tmp_path / "val.tsv"),
        max_steps=60,
        eval_every=30,
        checkpoint_every=60,
        learning_rate=1e-2,
        micro_batch_size=16,
    )
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert summary["final_eval"]["val_accuracy"] >= 0.95, summary["final_eval"]
    assert summary["final_eval"]["val_loss"] < first["loss"]
    assert summary["finetune"]["metric"] == "classification" and "val_matthews_correlation" in summary["final_eval"]
    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    cfg = json.loads((final / "finetune_config.json").read_text())
    model = PeftModel.from_pretrained(
        HybridMambaForSequenceClassification.from_pretrained(
            cfg["base_model"], num_labels=cfg["num_labels"], pad_token_id=0
        ),
        final,
    )
    assert any("score" in n for n, _ in model.named_parameters())


# Importance-guided rank allocation


def test_importance_allocation_stays_within_the_uniform_budget(tokenizer):
    model = HybridMambaForCausalLM(tiny_config("hybrid", vocab_size=len(tokenizer)))
    batches = [{"input_ids": (ids := torch.randint(3, len(tokenizer), (4, 16))), "labels": ids} for _ in range(2)]
    spectra = measure_importance(model, batches, ALL)
    names = target_module_names(model, ALL)
    assert list(spectra) == names and all((s[:-1] >= s[1:]).all() and s[0] > 0 for s in spectra.values())
    assert all(p.grad is None for p in model.parameters())  # measuring leaves no gradients behind
    budget = uniform_budget(model, ALL, 4)
    ranks = allocate_ranks(model, spectra, budget, r_min=1, r_max=16)
    assert min(ranks.values()) >= 1 and max(ranks.values()) <= 16 and len(set(ranks.values())) > 1
    rank_pattern, alpha_pattern = rank_and_alpha_patterns(ranks, 4, 8)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    )
    realised = {
        n: m.r["default"] for n, m in lora.get_base_model().named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")
    }
    assert realised == ranks
    spent = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    smallest_unit = min(m.in_features + m.out_features for n, m in model.named_modules() if n in ranks)
    assert budget - smallest_unit < spent <= budget
    assert all(
        m.scaling["default"] == pytest.approx(2.0) for m in lora.modules() if hasattr(m, "lora_A")
    )  # alpha / r kept


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "trainers" / "configs").glob("finetune_*.yaml")):
        args = parse_args(FinetuneArgs, ["--config", str(path)])
        assert args.task in ("chat", "classification") and args.adapter in ("lora", "qlora")


def test_seed_statistics():
    from hybrid_mamba.common.stats import paired, summarize

    s = summarize([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    assert s["ci95"] == pytest.approx([2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5])  # t(0.975, 2 dof)
    assert summarize([0.5])["std"] is None  # one value has no spread (common/stats.py: None, never NaN)
    p = paired([0.1, -0.2, 0.0, 0.3])
    assert (p["above"], p["below"], p["zero"]) == (2, 1, 1) and 0 < p["wilcoxon_p"] <= 1


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_interrupted_adapter_run_resumes_to_the_same_losses(tmp_path, base, monkeypatch, adapter):
    if adapter == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    train_file, val_file = chat_files(tmp_path)
    # 24 conversations, 3 batches an epoch: killed at step 5 (epoch 1), resumed from step 4 (one batch of
    # epoch 1 to skip), then on into epoch 2: every data order must be the uninterrupted run's
    common = dict(
        task="chat",
        adapter=adapter,
        train_file=str(train_file),
        validation_file=str(val_file),
        max_steps=7,
        eval_every=2,
        checkpoint_every=2,
    )
    run_finetune(tmp_path / "a", base, **common)  # uninterrupted
    AcceleratorState._reset_state(reset_partial_state=True)

    real_load = finetune.load_base

    def crash_at_step_5(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward, steps = model.forward, []

        def counted(*a, **k):
            if model.training:
                steps.append(1)
                if len(steps) == 5:
                    raise InterruptedError("killed at step 5")
            return forward(*a, **k)

        model.forward = counted
        return model

    monkeypatch.setattr(finetune, "load_base", crash_at_step_5)
    with pytest.raises(InterruptedError):
        run_finetune(tmp_path / "b", base, **common)
    monkeypatch.setattr(finetune, "load_base", real_load)
    AcceleratorState._reset_state(reset_partial_state=True)
    run_finetune(tmp_path / "b", base, **common)  # resumes from checkpoints/step_00000004

    def losses(root):
        rows = [json.loads(r) for r in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r.get("loss", r.get("val_loss")) for r in rows]

    assert len(losses(tmp_path / "b")) == 11  # 7 training rows, 4 evaluations: no row twice
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)
