"""Distilling an all-attention teacher into a hybrid (modeling/distill_init.py, trainers/distill.py).

The student's Mamba-2 mixers start from the attention weights (q -> C, k -> B, v -> x, o -> out_proj, in
`in_proj`'s z, x, B, C, dt order); everything else is the teacher's. Then the shared loop trains it on the
KL to the frozen teacher.
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hybrid_mamba.common import cli
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.distill_init import distill_init, in_proj_slices, student_config
from hybrid_mamba.modeling.distill_init import main as init_main
from hybrid_mamba.trainers import distill
from hybrid_mamba.trainers.data import collate_packed, load_packed

# debug preset: hidden 64, 4 query heads and 2 key/value heads of 16, so each key/value head serves 2 heads
HEADS, KV, P, D = 4, 2, 16, 64


def teacher_model(bias=True, layers=4, seed=0):
    torch.manual_seed(seed)
    m = HybridMambaForCausalLM(tiny_config(["attention"] * layers, attention_bias=bias))
    with torch.no_grad():  # norms away from their init of ones, so copying them is visible
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def ids(b=2, t=19, seed=0):
    return torch.randint(3, 512, (b, t), generator=torch.Generator().manual_seed(seed))


def test_student_config_sizes_the_mixer_for_an_exact_mapping():
    c = student_config(teacher_model().config, [1])
    assert c.layer_types == ["mamba2", "attention", "mamba2", "mamba2"]
    assert (c.mamba_n_heads, c.mamba_head_dim, c.mamba_d_state, c.mamba_n_groups) == (HEADS, P, P, HEADS)
    assert c.mamba_d_inner == HEADS * P and c.mamba_proj_bias
    # z, x, B, C, dt: the order our mixer (and mamba-ssm's Mamba2, transformers' Mamba2Mixer) splits in_proj
    s = in_proj_slices(c)
    assert [(s[k].start, s[k].stop) for k in ("z", "x", "B", "C", "dt")] == [
        (0, 64),
        (64, 128),
        (128, 192),
        (192, 256),
        (256, 260),
    ]


def test_student_carries_the_teacher_weights_where_the_mapping_says():
    teacher = teacher_model()
    student = distill_init(teacher, [1], seed=3)
    t, s = teacher.state_dict(), student.state_dict()
    for i in (0, 2, 3):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mamba."
        w, b = s[m + "in_proj.weight"], s[m + "in_proj.bias"]
        assert w.shape == (2 * 64 + 2 * 64 + HEADS, D)
        for h in range(HEADS):  # head h reads key/value head h // 2, as repeat_kv pairs them
            g = h // (HEADS // KV)
            rows = slice(h * P, (h + 1) * P)
            kv_rows = slice(g * P, (g + 1) * P)
            assert torch.equal(w[64:128][rows], t[a + "v_proj.weight"][kv_rows])  # x <- v
            assert torch.equal(w[128:192][rows], t[a + "k_proj.weight"][kv_rows])  # B <- k
            assert torch.equal(w[192:256][rows], t[a + "q_proj.weight"][rows])  # C <- q
            assert torch.equal(b[64:128][rows], t[a + "v_proj.bias"][kv_rows])
            assert torch.equal(b[128:192][rows], t[a + "k_proj.bias"][kv_rows])
            assert torch.equal(b[192:256][rows], t[a + "q_proj.bias"][rows])
        assert torch.equal(s[m + "out_proj.weight"], t[a + "o_proj.weight"])
        assert torch.equal(s[m + "out_proj.bias"], t[a + "o_proj.bias"])
        # z and dt rows are fresh, not a copy of anything
        assert not any(torch.equal(w[:64], t[a + n + "_proj.weight"]) for n in "qo")
        # the repeated channels' conv starts equal (the paper convolves before repeating), the rest differ
        conv = s[m + "conv1d.weight"]
        assert torch.equal(conv[0:16], conv[16:32]) and torch.equal(conv[64:80], conv[80:96])
        assert not torch.equal(conv[0:16], conv[32:48]) and not torch.equal(conv[128:144], conv[144:160])
        # fresh SSM parameters: Mamba-2's default init
        assert torch.equal(s[m + "D"], torch.ones(HEADS))
        assert ((-s[m + "A_log"]).exp() <= 1).all() and ((-s[m + "A_log"]).exp() >= 1 / 16).all()
        dt = torch.nn.functional.softplus(s[m + "dt_bias"])
        assert ((dt > 5e-4) & (dt < 0.2)).all()
        assert not any(k.startswith(a) for k in s)
    untouched = [k for k in t if not any(k.startswith(f"model.layers.{i}.self_attn.") for i in (0, 2, 3))]
    assert set(untouched) <= set(s)
    for k in untouched:  # embeddings, norms, MLPs, layer 1's attention, final norm, lm_head
        assert torch.equal(s[k], t[k]), k
    assert len([k for k in untouched if "layers.1.self_attn" in k]) == 8


def test_keeping_every_layer_is_the_teacher():
    teacher = teacher_model()
    student = distill_init(teacher, [0, 1, 2, 3])
    x = ids()
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_student_decodes_with_its_cache_as_a_full_forward():
    student = distill_init(teacher_model(bias=False), [2])
    x = ids(2, 9)
    with torch.no_grad():
        out = student.generate(
            x, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = student(out.sequences, use_cache=False).logits
    steps = torch.stack(out.logits, dim=1)  # (B, 8, V): the logits of each generated token
    torch.testing.assert_close(steps, full[:, 8:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(steps.argmax(-1), out.sequences[:, 9:])


def test_cli_writes_a_folder_that_loads_with_remote_code(tmp_path):
    teacher = teacher_model()
    teacher.save_pretrained(tmp_path / "teacher")
    init_main(["--teacher", str(tmp_path / "teacher"), "--attention_layers", "1,3", "--out", str(tmp_path / "s")])
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["layer_types"] == ["mamba2", "attention", "mamba2", "attention"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=True).eval()
    expected = distill_init(teacher, [1, 3], seed=0)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected(x).logits, atol=1e-5, rtol=1e-5)


def test_a_llama_teacher_is_converted_first(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=D,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    init_main(["--teacher", str(tmp_path / "llama"), "--attention_layers", "1", "--out", str(tmp_path / "s")])
    student = HybridMambaForCausalLM.from_pretrained(tmp_path / "s").eval()
    s, t = student.state_dict(), llama.state_dict()
    assert torch.equal(s["model.layers.0.mamba.in_proj.weight"][192:256], t["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(
        s["model.layers.0.pre_mlp_layernorm.weight"], t["model.layers.0.post_attention_layernorm.weight"]
    )
    assert torch.equal(s["model.layers.1.self_attn.k_proj.weight"], t["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])


def test_mapping_refusals():
    with pytest.raises(ValueError, match="fall outside"):
        student_config(teacher_model().config, [4])
    hybrid = tiny_config(["attention", "mamba2"])
    with pytest.raises(ValueError, match="must be all attention"):
        student_config(hybrid, [0])
    odd = tiny_config(["attention"] * 2, head_dim=24)  # 4 heads of 24 = 96: not a multiple of hidden 64
    with pytest.raises(ValueError, match="not a whole multiple"):
        student_config(odd, [])


def _exit(argv, capsys, main=init_main):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, argv)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, err = _exit(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err[-1].startswith("error: ") and "has no config.json" in err[-1]
    teacher_model().save_pretrained(tmp_path / "t")
    code, err = _exit(
        ["--teacher", str(tmp_path / "t"), "--attention_layers", "1;3", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "comma-separated" in err[-1]
    code, err = _exit(
        ["--teacher", str(tmp_path / "t"), "--attention_layers", "7", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "fall outside" in err[-1]
    assert not (tmp_path / "o").exists()
    args = [
        "--teacher",
        str(tmp_path / "t"),
        "--student",
        str(tmp_path / "missing"),
        "--output_dir",
        str(tmp_path / "r"),
    ]
    code, err = _exit(args, capsys, distill.main)
    assert code == 2 and "--student" in err[-1] and "has no config.json" in err[-1]
    code, err = _exit([*args, "--temperature", "0"], capsys, distill.main)
    assert code == 2 and "--temperature must be positive" in err[-1]


# the objective


def test_kl_loss_is_the_token_mean_over_real_tokens():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    per = distill.kl_per_token(s, t, temperature=2.0)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p * (p.log() - q.log())).sum(-1) * 4
    torch.testing.assert_close(per, expected)
    assert (per > 0).all() and torch.equal(distill.kl_per_token(t, t), torch.zeros(2, 5))

    class Fixed(torch.nn.Module):  # a model returning given logits
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, **kw):
            return type("Out", (), {"logits": self.logits, "loss": torch.tensor(3.0)})()

    loss = distill.DistillLoss(Fixed(t), kl_weight=1.0, lm_weight=0.5, temperature=2.0)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask, "labels": torch.zeros(2, 5)}
    value = loss(Fixed(s), batch)
    torch.testing.assert_close(value, (expected * mask).sum() / 7 + 1.5)
    assert not loss.teacher.training and not any(p.requires_grad for p in loss.teacher.parameters())


def _kl_to_teacher(student_dir, teacher, data):
    student = HybridMambaForCausalLM.from_pretrained(student_dir).eval()
    _, val, _ = load_packed(data)
    batch = collate_packed([val[i] for i in range(len(val))])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        t = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    return distill.kl_per_token(s, t).mean().item()


def _distill(tmp_path, data, name, **fields):
    args = {
        "teacher": tmp_path / "teacher",
        "student": tmp_path / "student",
        "data_dir": data,
        "output_dir": tmp_path / name,
        "micro_batch_size": 8,
        "max_steps": 12,
        "warmup_steps": 2,
        "learning_rate": 3e-3,
        "eval_every": 100,
        "checkpoint_every": 6,
        "log_every": 3,
        "lm_weight": 0.0,
        **fields,
    }
    return distill.main([f"--{k}={v}" for k, v in args.items()])


def test_distillation_reduces_the_kl_and_resumes(tmp_path, tiny_data):
    teacher = teacher_model(bias=False, layers=3)
    with torch.no_grad():  # peaked next-token distributions (a random init's are nearly uniform)
        teacher.model.norm.weight.mul_(30)
    teacher.save_pretrained(tmp_path / "teacher")
    distill_init(teacher, [1]).save_pretrained(tmp_path / "student")
    before = _kl_to_teacher(tmp_path / "student", teacher, tiny_data)
    summary = _distill(tmp_path, tiny_data, "run")
    after = _kl_to_teacher(tmp_path / "run" / "final", teacher, tiny_data)
    assert after < 0.7 * before, (before, after)
    assert summary["final_eval"]["val_kl"] == pytest.approx(after, rel=1e-4)
    # the teacher is not trained and not saved: its folder is untouched, the checkpoint holds the student only
    reloaded = HybridMambaForCausalLM.from_pretrained(tmp_path / "teacher")
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), teacher.parameters()))
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    saved = load_file(next(ckpt.glob("model*.safetensors")))
    assert sorted(saved) == sorted(load_file(tmp_path / "student" / "model.safetensors"))
    # resume from the step-6 checkpoint: the same student at step 12
    for leftover in ("final", "best", "summary.json"):
        path = tmp_path / "run" / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = _distill(tmp_path, tiny_data, "run")
    assert resumed["final_eval"]["val_kl"] == pytest.approx(summary["final_eval"]["val_kl"], abs=1e-6)
    assert resumed["final_val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6)


def test_rescore_adds_the_held_out_table_and_keeps_the_rest(tmp_path, monkeypatch):
    from hybrid_mamba.eval_harness import bench_distill

    results = {
        "args": {**vars(bench_distill.BenchDistillArgs()), "out": "OUT"},
        "machine": {"cpu": "cpu"},
        "seq_len": 8,
        "tokens_per_step": 32,
        "unigram_baseline_val_loss": 7.0,
        "rows": [
            {
                "model": m,
                "parameters": 10**6,
                "training_tokens": 1,
                "tokens_incl_teacher": 1,
                "val_loss": 6.0,
                "val_kl": 0.1,
            }
            for m in ("teacher", "distilled", "scratch")
        ],
        "curves": {
            "distilled": [{"step": 1, "val_loss": 6.5, "val_kl": 0.2}],
            "scratch": [{"step": 1, "val_loss": 7.0}],
        },
        "decode_ms_per_token": {"128": {"teacher": 1.0, "hybrid": 0.5}},
        "decode": {},
        "timings_s": {"total_s": 1.0},
    }
    out, work = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    (out / "bench_distill.json").write_text(json.dumps(results))
    for name in ("teacher", "distilled"):  # scratch/final is missing: not scored
        (work / name / "final").mkdir(parents=True)
        (work / name / "final" / "config.json").write_text("{}")

    def fake_scores(folders, args):  # what held_out_scores returns, without running lm-eval
        def cell(v, se, better):
            return {"value": v, "stderr": se, "higher_is_better": better}

        return {
            "folders": {n: str(f) for n, f in folders.items()},
            "models": {
                "teacher": {"demo_heldout_ppl": {"word_perplexity": cell(123456.7, None, False)}},
                "distilled": {
                    "demo_heldout_ppl": {"word_perplexity": cell(99.5, None, False)},
                    "demo_heldout_mc": {"acc": cell(0.25, 0.0694, True)},
                },
            },
            "documents": {"demo_heldout_ppl": 40, "demo_heldout_mc": 40},
            "skipped_tasks": {},
            "errors": [{"model": "teacher", "task": "demo_heldout_mc", "error": "RuntimeError: boom"}],
            "seed": 0,
            "limit": None,
            "batch_size": 4,
            "rescore": args.rescore,
            "out": args.out,
            "machine": {"lm_eval": "0.4.13", "cpu": "cpu", "threads": 1, "date": "today"},
        }

    monkeypatch.setattr(bench_distill, "held_out_scores", fake_scores)
    threads = torch.get_num_threads()
    try:
        bench_distill.main(["--out", str(out), "--work_dir", str(work), "--rescore", "true"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((out / "bench_distill.json").read_text())
    assert list(saved["lm_eval"]["folders"]) == ["teacher", "distilled"]
    assert {k: v for k, v in saved.items() if k != "lm_eval"} == results
    md = (out / "bench_distill.md").read_text()
    head, rest = md.split("## Held-out lm-eval tasks\n")
    section, tail = rest.split("## Decode latency")
    assert head + "## Decode latency" + tail == bench_distill.to_markdown(results)  # the rest unchanged
    assert "| task | metric | teacher | distilled |" in section
    assert "| demo_heldout_ppl | word_perplexity ↓ | 123,457 | 99.500 |" in section
    assert "| demo_heldout_mc | acc ↑ | - | 0.250 ± 0.069 |" in section
    assert "- teacher / demo_heldout_mc: RuntimeError: boom" in section
    assert "--rescore true" in section
    # nothing trained under the work folder: an error before any scoring
    with pytest.raises(FileNotFoundError, match="no final/ model folder"):
        bench_distill.main(["--out", str(out), "--work_dir", str(tmp_path / "none"), "--rescore", "true"])
