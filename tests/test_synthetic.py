"""Synthetic tasks (data_scripts/synthetic.py) and their scoring and lm-eval export (eval_harness/synthetic_eval.py).

The answers are derived again here from each example's own tokens, independently of the generators.
"""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer

from hybrid_mamba.data_scripts import synthetic
from hybrid_mamba.data_scripts.synthetic import TASKS, SpecError, build
from hybrid_mamba.eval_harness import synthetic_eval
from hybrid_mamba.eval_harness.synthetic_eval import score, write_lm_eval_tasks
from hybrid_mamba.trainers.data import collate_packed, load_packed

IGNORE = -100
TINY = dict(
    train_examples=60, val_examples=10, test_examples=6, train_lengths=[40, 48], eval_lengths=[40, 48, 80], block_len=64
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {task: build(task, TINY, root / task) for task in TASKS}


def tokens_of(data: Path):
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    return tok, tok.convert_ids_to_tokens


def expected_answers(task: str, toks: list[str], spec: dict) -> list[bool]:
    """Which positions answer the task, derived from the tokens alone; asserts the example is well formed."""
    n = len(toks)
    assert toks[0] == "<s>"
    if task == "mqar":
        pairs = {}
        for i in range(1, 1 + 2 * spec["num_pairs"], 2):
            assert re.fullmatch(r"k\d+", toks[i]) and re.fullmatch(r"v\d+", toks[i + 1]), toks[i : i + 2]
            assert toks[i] not in pairs  # keys distinct
            pairs[toks[i]] = toks[i + 1]
        mask = [False] * n
        queries = 0
        for i in range(1 + 2 * spec["num_pairs"], n):
            if toks[i].startswith("k"):
                assert toks[i + 1] == pairs[toks[i]]  # the value shown with that key
                mask[i + 1] = True
                queries += 1
            elif not mask[i]:
                assert toks[i] == "_"
        assert queries == spec["num_queries"]
        return mask
    if task == "selective_copy":
        sep = toks.index("|")
        content = [t for t in toks[1:sep] if t != "_"]
        assert len(content) == spec["num_tokens"] and toks[sep + 1 :] == content  # copied in order
        return [i > sep for i in range(n)]
    if task == "induction":
        triggers = [i for i, t in enumerate(toks) if t == "@"]
        assert len(triggers) == 2 and triggers[1] == n - 2
        assert toks[-1] == toks[triggers[0] + 1]  # the token that followed the first trigger
        return [i == n - 1 for i in range(n)]
    if task == "passkey":
        text = " ".join(toks)
        key = re.search(r"the pass key is ((?:\d )+)\. remember it \.", text).group(1).split()
        assert len(key) == spec["num_digits"] and text.endswith("what is the pass key ? " + " ".join(key))
        assert toks[n - len(key) :] == key
        return [i >= n - len(key) for i in range(n)]
    raise AssertionError(task)


def unpack(row: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """The (input_ids, labels, position_ids) pieces of a packed block, cut where position_ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [tuple(row[c][a:b] for c in ("input_ids", "labels", "position_ids")) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_labels_and_packing(task, built):
    data = built[task]
    spec = json.loads((data / "spec.json").read_text())["spec"]
    tok, names = tokens_of(data)
    checked = 0
    for split in ("train", "validation"):
        examples = 0
        for row in load_from_disk(str(data / split)):
            assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == spec["block_len"]
            for ids, labels, positions in unpack(row):
                assert positions == list(range(len(ids)))
                if ids[0] == tok.pad_token_id:  # the filler of a block's rest
                    assert set(ids) == {tok.pad_token_id} and set(labels) == {IGNORE}
                    continue
                assert len(ids) in spec["train_lengths"]
                mask = expected_answers(task, names(ids), spec)
                assert labels == [t if m else IGNORE for t, m in zip(ids, mask)]
                examples += 1
        assert examples == spec["train_examples" if split == "train" else "val_examples"]
        checked += examples
    test = load_from_disk(str(data / "test"))
    assert sorted(test["length"]) == sorted(spec["eval_lengths"] * spec["test_examples"])
    for row in test:
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        mask = expected_answers(task, names(row["input_ids"]), spec)
        assert row["labels"] == [t if m else IGNORE for t, m in zip(row["input_ids"], mask)]
        text = tok.decode(row["input_ids"])  # one token per symbol: text and tokens map 1:1
        assert tok(text, add_special_tokens=False)["input_ids"] == row["input_ids"]
    assert checked == TINY["train_examples"] + TINY["val_examples"]


def test_same_seed_same_folder_other_seed_other_data(built, tmp_path):
    again = build("mqar", TINY, tmp_path / "again")
    other = build("mqar", {**TINY, "seed": 1}, tmp_path / "other")
    reports = [json.loads((d / "report.json").read_text())["splits"] for d in (built["mqar"], again, other)]
    for split in ("train", "validation", "test"):
        assert reports[0][split]["sha256"] == reports[1][split]["sha256"] != reports[2][split]["sha256"]
    for name in ("train", "validation", "test"):
        (a,) = (built["mqar"] / name).glob("*.arrow")
        (b,) = (again / name).glob("*.arrow")
        assert a.read_bytes() == b.read_bytes()
    assert reports[0]["train"]["answer_tokens"] == TINY["train_examples"] * 8  # num_queries answers each


def test_trainer_reads_the_folder_and_learns_only_answers(built):
    train, val, tok = load_packed(str(built["mqar"]))
    batch = collate_packed([train[0], train[1]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, TINY["block_len"])
    answers = batch["labels"] != IGNORE
    assert 0 < answers.sum() < answers.numel() // 4
    assert torch.equal(batch["labels"][answers], batch["input_ids"][answers])
    values = {i for t, i in tok.get_vocab().items() if re.fullmatch(r"v\d+", t)}
    assert set(batch["labels"][answers].tolist()) <= values


def test_build_reuses_the_same_spec_and_refuses_another(built, monkeypatch):
    data = built["induction"]
    before = (data / "report.json").stat().st_mtime_ns

    def no_rebuild(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(synthetic, "generate", no_rebuild)
    assert build("induction", TINY, data) == data
    assert (data / "report.json").stat().st_mtime_ns == before
    with pytest.raises(SpecError, match="different spec.*--overwrite"):
        build("induction", {**TINY, "seed": 5}, data)
    monkeypatch.undo()
    build("induction", {**TINY, "seed": 5}, data, overwrite=True)
    assert json.loads((data / "spec.json").read_text())["spec"]["seed"] == 5
    build("induction", TINY, data, overwrite=True)  # as the other tests expect it


@pytest.mark.parametrize(
    "task, spec, says",
    [
        ("mqar", {"num_queries": 9}, "num_queries: 9 exceeds num_pairs 8"),
        ("mqar", {"train_lengths": [32]}, "train_lengths: length 32 is too short"),
        ("passkey", {"block_len": 100, "train_lengths": [64, 128]}, "block_len: 100 is shorter than"),
        ("selective_copy", {"num_pairs": 3}, "unknown field 'num_pairs'"),
        ("induction", {"eval_lengths": []}, "eval_lengths: give at least one length"),
        ("copy", {}, "Unknown task 'copy'"),
    ],
)
def test_a_bad_spec_is_one_clear_error_before_any_work(task, spec, says, tmp_path):
    with pytest.raises(SpecError, match=re.escape(says)):
        build(task, spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Teacher(torch.nn.Module):
    """Logits at t put all mass on token t+`ahead` of the input: ahead=1 is an oracle under teacher
    forcing, ahead=0 the off-by-one mistake of predicting the current token."""

    def __init__(self, vocab: int, ahead: int):
        super().__init__()
        self.vocab, self.ahead = vocab, ahead

    def forward(self, input_ids, use_cache=False):
        target = torch.roll(input_ids, -self.ahead, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


class Noise(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(0)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.randn(*input_ids.shape, self.vocab, generator=self.gen))


@pytest.mark.parametrize("task", ["mqar", "passkey"])
def test_score_oracle_is_perfect_and_noise_is_chance(task, built):
    data = built[task]
    vocab = len(AutoTokenizer.from_pretrained(str(data / "tokenizer")))
    oracle = score(Teacher(vocab, 1), data, batch_size=4)
    assert oracle["train_lengths"] == TINY["train_lengths"]
    assert list(oracle["lengths"]) == ["40", "48", "80"]
    assert [r["extrapolation"] for r in oracle["lengths"].values()] == [False, False, True]
    for r in [*oracle["lengths"].values(), oracle["overall"]]:
        assert r["token_accuracy"] == r["example_accuracy"] == 1.0
    assert oracle["overall"]["n_examples"] == 3 * TINY["test_examples"]
    answers_each = 8 if task == "mqar" else 5
    assert oracle["overall"]["n_answer_tokens"] == 3 * TINY["test_examples"] * answers_each
    assert score(Teacher(vocab, 0), data)["overall"]["token_accuracy"] < 0.2  # the shift matters
    noise = score(Noise(vocab), data, lengths=[48])
    assert list(noise["lengths"]) == ["48"] and noise["overall"]["token_accuracy"] < 0.25
    assert noise["overall"]["example_accuracy"] < 0.2
    with pytest.raises(ValueError, match="no examples of length"):
        score(Noise(vocab), data, lengths=[33])


@pytest.fixture(scope="module")
def tiny_model(built, tmp_path_factory):
    from conftest import tiny_config

    from hybrid_mamba.modeling import HybridMambaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(built["mqar"] / "tokenizer"))
    folder = tmp_path_factory.mktemp("model") / "final"
    HybridMambaForCausalLM(tiny_config("hybrid", vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_lm_eval_export_scores_a_saved_model(built, tiny_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    names = write_lm_eval_tasks(built["mqar"], out)
    assert names == ["synthetic_mqar", "synthetic_mqar_len40", "synthetic_mqar_len48", "synthetic_mqar_len80"]
    items = [json.loads(line) for line in (out / "synthetic_mqar_len80.jsonl").read_text().splitlines()]
    assert len(items) == TINY["test_examples"] * 8  # one item per query
    for it in items:
        assert it["context"].startswith("<s> k") and re.search(r" k\d+$", it["context"])
        assert re.fullmatch(r" v\d+", it["target"])
        toks = it["context"].split()
        assert dict(zip(toks[1:17:2], toks[2:17:2]))[toks[-1]] == it["target"].strip()  # the queried key's value

    result = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model},trust_remote_code=True",
        tasks=["synthetic_mqar"],
        device="cpu",
        batch_size=8,
        task_manager=TaskManager(include_path=str(out), include_defaults=False),
    )
    # an MQAR item is one answer token: lm-eval's greedy check is score's token accuracy, length by length
    direct = score(tiny_model, built["mqar"])  # the same model, loaded from its path
    n = TINY["test_examples"] * 8
    for length in (40, 48, 80):
        r = result["results"][f"synthetic_mqar_len{length}"]
        assert r["perplexity,none"] > 1.0
        assert r["acc,none"] == pytest.approx(direct["lengths"][str(length)]["token_accuracy"], abs=1.01 / n)
    assert "acc,none" in result["results"]["synthetic_mqar"]


def test_command_lines(built, tiny_model, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({**TINY, "num_digits": 3}))
    assert (
        synthetic.main(["--task", "passkey", "--output", str(tmp_path / "pk"), "--spec", str(spec), "--seed", "4"]) == 0
    )
    record = json.loads((tmp_path / "pk" / "spec.json").read_text())
    assert record["task"] == "passkey" and record["spec"]["seed"] == 4 and record["spec"]["num_digits"] == 3
    argv = ["--data", str(built["mqar"]), "--model", str(tiny_model), "--out", str(tmp_path / "r.json")]
    assert synthetic_eval.main([*argv, "--lengths", "40", "80", "--lm_eval_tasks", str(tmp_path / "t")]) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert list(written["lengths"]) == ["40", "80"] and written["model"] == str(tiny_model)
    assert "extrapolation" in capsys.readouterr().out
    assert (tmp_path / "t" / "synthetic_mqar.yaml").is_file()
    with pytest.raises(ValueError, match="nothing to do"):
        synthetic_eval.main(["--data", str(built["mqar"])])


@pytest.mark.slow
def test_pretrain_on_mqar_takes_the_loss_on_answers_only(tmp_path):
    import test_trainer

    data = build("mqar", {**TINY, "train_examples": 800, "val_examples": 40}, tmp_path / "mqar")
    proc = test_trainer.run_pretrain(
        tmp_path, data, "run", max_steps=30, eval_every=15, checkpoint_every=15, learning_rate=3e-3
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    vocab = len(AutoTokenizer.from_pretrained(str(data / "tokenizer")))
    # the targets are values only: their unigram cross-entropy is ln(num_values), not ln(vocab)
    assert summary["unigram_baseline_val_loss"] == pytest.approx(math.log(16), abs=0.1)
    assert summary["final_val_loss"] < math.log(vocab) - 0.3
    assert summary["final_val_loss"] == pytest.approx(math.log(16), abs=0.4)  # learnt: answers are values
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    result = score(tmp_path / "run" / "final", data)
    assert set(result["lengths"]) == {"40", "48", "80"}
