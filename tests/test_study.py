"""The study runner (eval_harness/study.py): spec checks, layouts, parameter matching, cell ids, and
tiny grids trained end to end through the real trainer (marked slow: every cell is a subprocess)."""

import json
from pathlib import Path

import pytest
import yaml

from hybrid_mamba.eval_harness import study
from hybrid_mamba.eval_harness.study import StudyError, load_spec

# MQAR small enough to train in a few steps; test lengths 32 (trained) and 64 (twice the training length)
TINY_TASK = {
    "train_examples": 200,
    "val_examples": 20,
    "test_examples": 8,
    "train_lengths": [32],
    "eval_lengths": [32, 64],
    "block_len": 64,
    "num_keys": 8,
    "num_values": 8,
    "num_pairs": 4,
    "num_queries": 2,
}
TINY_TRAIN = {
    "max_steps": 4,
    "micro_batch_size": 4,
    "warmup_steps": 1,
    "eval_every": 2,
    "eval_batches": 2,
    "checkpoint_every": 2,
    "log_every": 1,
}


def synthetic_spec(**overrides) -> dict:
    """2 layouts (all-attention RoPE, a NoPE hybrid) x width 32 x 2 seeds on tiny MQAR."""
    spec = {
        "name": "tiny",
        "kind": "synthetic",
        "task": "mqar",
        "task_spec": dict(TINY_TASK),
        "layouts": {
            "attn_rope": {"layer_types": ["attention", "attention"], "position_embedding_type": "rope"},
            "hybrid_nope": {"layer_types": ["mamba2", "attention"], "position_embedding_type": "none"},
        },
        "widths": [32],
        "seeds": [0, 1],
        "threads": 1,
        "train": dict(TINY_TRAIN),
        "eval": {"batch_size": 8},
    }
    spec.update(overrides)
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layouts": {"a": {"layer_types": ["attention", "lstm"]}}}, "entries are attention, mamba2 or mamba1"),
        ({"layouts": {"a": {"layer_types": ["attention"], "attention_ratio": 0.5}}}, "exactly one of"),
        ({"layouts": {"a": {"attention_ratio": 0.5, "placement": "middle"}}}, "'middle' is not one of"),
        ({"task": "sorting"}, "unknown task(s) ['sorting']"),
        ({"task_spec": {**TINY_TASK, "num_queries": 9}}, "num_queries"),
        ({"train": {"max_stepz": 3}}, "unknown field 'max_stepz'"),
        ({"train": {"seed": 3}}, "set by the study runner"),
        ({"widths": [40]}, "multiple of head_dim"),
        ({"kind": "lm"}, "tasks are for kind synthetic"),
        ({"layouts": {"a": {"layer_types": ["attention"], "overrides": {"num_attention_heads": 3}}}}, "must divide"),
        ({"equal": "params", "equal_reference": "nope"}, "equal_reference"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_spec_is_one_clear_error(tmp_path, change, message):
    path = write_spec(tmp_path, synthetic_spec(**change))
    with pytest.raises(StudyError) as err:
        load_spec(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_bad_spec_fails_before_any_work(tmp_path, capsys):
    path = write_spec(tmp_path, synthetic_spec(train={"max_steps": "many"}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        from hybrid_mamba.common.cli import run_main

        run_main(study.main, ["--spec", str(path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "train.max_steps" in err[-1]
    assert not out.exists()


def test_placements_and_compact_layouts():
    assert study.placement_indices(8, 2, "early") == [0, 1]
    assert study.placement_indices(8, 2, "late") == [6, 7]
    assert study.placement_indices(8, 2, "spread") == [2, 6]
    assert study.placement_indices(8, 1, "seed_rule") == [4]
    assert study.placement_indices(8, 3, "seed_rule") == [0, 4, 7]
    assert study.placement_indices(16, 8, "seed_rule") == [0, 1, 2, 7, 8, 9, 14, 15]
    for placement in study.PLACEMENTS:
        for n in range(17):
            assert len(study.placement_indices(16, n, placement)) == n
    layout = study.LayoutSpec(attention_ratio=1 / 16, placement="late", mamba="mamba1")
    assert study.expand_layout(layout, 16) == ["mamba1"] * 15 + ["attention"]
    # a ratio that rounds to no layer still gets one
    assert study.expand_layout(study.LayoutSpec(attention_ratio=0.05), 4).count("attention") == 1
    assert study.expand_layout(study.LayoutSpec(attention_ratio=0.0), 4) == ["mamba2"] * 4


def test_equal_params_matches_the_reference(tmp_path):
    spec = synthetic_spec(
        equal="params",
        widths=[32, 64],
        layouts={
            "attention": {"layer_types": ["attention"] * 4},
            "mamba2": {"layer_types": ["mamba2"] * 4},
            "hybrid": {"attention_ratio": 0.25, "placement": "seed_rule"},
        },
    )
    plan = study.plan_params(load_spec(write_spec(tmp_path, spec)))
    for width in (32, 64):
        target = plan[("attention", width)]["params"]["non_embedding"]
        for name in ("mamba2", "hybrid"):
            entry = plan[(name, width)]
            assert entry["target_non_embedding"] == target
            # one more intermediate unit adds 3 * width parameters to each of the 4 MLPs
            assert abs(entry["params"]["non_embedding"] - target) <= 4 * 3 * width / 2
            assert entry["overrides"]["intermediate_size"] != 2 * width
    # without matching, Mamba-2 layers are bigger than attention layers at the same width
    plain = study.plan_params(load_spec(write_spec(tmp_path, {**spec, "equal": "tokens"}, "plain.yaml")))
    assert plain[("mamba2", 32)]["params"]["non_embedding"] > plain[("attention", 32)]["params"]["non_embedding"]


def test_changed_config_is_a_new_cell(tmp_path):
    def ids(spec):
        cells, _ = study.plan_cells(load_spec(write_spec(tmp_path, spec)), tmp_path / "out", build_data=False)
        return {(c.layout, c.seed): c.cell_id for c in cells}

    base = ids(synthetic_spec())
    assert len(set(base.values())) == 4
    assert ids(synthetic_spec()) == base  # deterministic
    more_steps = ids(synthetic_spec(train={**TINY_TRAIN, "max_steps": 5}))
    assert not set(more_steps.values()) & set(base.values())
    other_nope = synthetic_spec()
    other_nope["layouts"]["hybrid_nope"]["position_embedding_type"] = "rope"
    changed = ids(other_nope)
    assert changed[("attn_rope", 0)] == base[("attn_rope", 0)]
    assert changed[("hybrid_nope", 0)] != base[("hybrid_nope", 0)]
    assert changed[("hybrid_nope", 0)].startswith("hybrid_nope_w32_mqar_s0_")


def test_scale_overrides(tmp_path):
    spec = synthetic_spec(scales={"full": {"widths": [32, 64], "train": {"max_steps": 9}}})
    path = write_spec(tmp_path, spec)
    assert load_spec(path).widths == [32]
    full = load_spec(path, "full")
    assert full.widths == [32, 64] and full.train["max_steps"] == 9 and full.train["eval_every"] == 2
    with pytest.raises(StudyError, match="scales are"):
        load_spec(path, "huge")


def test_loss_curve_and_time_budget(tmp_path):
    rows = [
        {"step": 2, "loss": 3.0, "tokens": 200, "tokens_per_s": 100.0},
        {"step": 4, "loss": 2.5, "tokens": 400, "tokens_per_s": 50.0},
        {"step": 4, "val_loss": 2.4, "val_ppl": 11.0},
        {"step": 3, "val_loss": 2.6, "val_ppl": 13.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    curve = study.loss_curve(tmp_path)
    assert [p["step"] for p in curve] == [3, 4]
    assert curve[0]["tokens"] == pytest.approx(300) and curve[0]["train_time_s"] == pytest.approx(4.0)
    assert curve[1]["tokens"] == pytest.approx(400) and curve[1]["train_time_s"] == pytest.approx(6.0)
    assert study.loss_at_budget(curve, 5.0) == 2.6
    assert study.loss_at_budget(curve, 10.0) == 2.4
    assert study.loss_at_budget(curve, 1.0) is None
    assert study.loss_at_budget(curve, None) is None


def test_calibrated_time_replaces_the_cells_clock(tmp_path):
    spec = load_spec(write_spec(tmp_path, synthetic_spec(time_budget_s=2.5)))
    result = {
        "status": "ok", "task": "mqar", "width": 32, "layout": "attn_rope",
        "metrics": {"tokens": 400, "train_time_s": 60.0, "val_loss_at_time_budget": None},
        "curve": [
            {"step": 2, "tokens": 200, "train_time_s": 50.0, "val_loss": 2.6},
            {"step": 4, "tokens": 400, "train_time_s": 60.0, "val_loss": 2.4},
        ],
    }  # fmt: skip
    speeds = {"mqar/32/attn_rope": {"tokens_per_s": 100.0, "step_s": 0.5, "times_s": [0.5]}}
    r = study.with_calibrated_time(result, speeds, spec)
    assert [p["train_time_s"] for p in r["curve"]] == [2.0, 4.0]
    assert [p["logged_train_time_s"] for p in r["curve"]] == [50.0, 60.0]
    assert r["metrics"]["train_time_s"] == 4.0 and r["metrics"]["logged_train_time_s"] == 60.0
    assert r["metrics"]["val_loss_at_time_budget"] == 2.6  # within 2.5 s at 100 tokens/s: the first evaluation
    assert result["curve"][0]["train_time_s"] == 50.0  # the cell's own result is left as it was
    assert study.with_calibrated_time(result, {}, spec) is result  # no speed for the cell: unchanged


@pytest.mark.parametrize("position", ["rope", "none"])
def test_position_losses_past_the_training_length(tmp_path, tiny_data, position):
    from conftest import tiny_config

    from hybrid_mamba.modeling import HybridMambaForCausalLM

    config = tiny_config(["mamba2", "attention"], vocab_size=320, position_embedding_type=position)
    HybridMambaForCausalLM(config).save_pretrained(tmp_path / "model")
    res = study.position_losses(tmp_path / "model", tiny_data, factor=4, buckets=4, sequences=2)
    assert res["train_len"] == 32 and res["seq_len"] == 128 and res["sequences"] == 2
    assert res["bucket_edges"] == [0, 32, 64, 96, 128]
    assert all(isinstance(v, float) and 0 < v < 20 for v in res["loss"])


@pytest.mark.slow
def test_synthetic_study_runs_resumes_and_aggregates(tmp_path):
    path = write_spec(tmp_path, synthetic_spec())
    out = tmp_path / "out"
    # an interrupted study: one cell only
    assert study.main(["--spec", str(path), "--out", str(out), "--max_cells", "1"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["complete"] is False and len(first["cells"]) == 1 and len(first["not_run"]) == 3
    done = out / "cells" / first["cells"][0]["cell_id"] / "result.json"
    mtime = done.stat().st_mtime_ns
    log_size = done.with_name("train.log").stat().st_size

    assert study.main(["--spec", str(path), "--out", str(out)]) == 0
    assert done.stat().st_mtime_ns == mtime  # not retrained, not rescored
    assert done.with_name("train.log").stat().st_size == log_size
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and not res["failed"] and not res["not_run"]
    assert len(res["cells"]) == 4 and all(c["status"] == "ok" for c in res["cells"])
    agg = {(a["layout"], a["metric"]): a for a in res["aggregates"]}
    for layout in ("attn_rope", "hybrid_nope"):
        # both position encodings score past the training length (64 = 2x)
        for metric in ("len32/example_accuracy", "len64/token_accuracy", "final_val_loss", "train_time_s"):
            a = agg[(layout, metric)]
            assert a["n"] == 2 and a["seeds"] == [0, 1] and a["ci95"] is not None
    cell = res["cells"][0]
    assert cell["params"]["non_embedding"] > 0 and cell["timings"]["trainer_wall_s"] > 0
    assert [p["step"] for p in cell["curve"]] == [2, 4] and cell["curve"][-1]["tokens"] == 4 * 4 * 64
    md = (out / "results.md").read_text()
    assert "| attn_rope | 32 |" in md and "(n=2)" in md and "len64" in md
    for plot in ("accuracy_vs_width.png", "accuracy_vs_length.png", "loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / plot).stat().st_size > 1000
    assert set(res["plots"]) >= {"accuracy_vs_width.png", "accuracy_vs_length.png"}


@pytest.mark.slow
def test_lm_study_position_loss_and_failed_cell(tmp_path, tiny_data):
    spec = {
        "name": "tiny_lm",
        "kind": "lm",
        "data_dir": str(tiny_data),
        "layouts": {
            "hybrid_nope": {"layer_types": ["mamba2", "attention"], "position_embedding_type": "none"},
            "attn_rope": {"layer_types": ["attention", "attention"]},
            # builds as a config, but the trainer refuses it: vocab_size below the tokenizer's
            "broken": {"layer_types": ["attention"], "overrides": {"vocab_size": 8}},
        },
        "widths": [32],
        "seeds": [0],
        "threads": 1,
        "time_budget_s": 1000.0,
        "speed_reps": 2,
        "speed_warmup": 1,
        "train": dict(TINY_TRAIN),
        "eval": {"position_factor": 4, "position_buckets": 4, "position_sequences": 2},
    }
    out = tmp_path / "out"
    assert study.main(["--spec", str(write_spec(tmp_path, spec)), "--out", str(out)]) == 1  # a cell failed
    res = json.loads((out / "results.json").read_text())
    status = {c["layout"]: c for c in res["cells"]}
    assert status["broken"]["status"] == "failed" and "vocab_size 8" in status["broken"]["error"]
    assert res["failed"] == [status["broken"]["cell_id"]] and res["complete"] is False
    for layout in ("hybrid_nope", "attn_rope"):
        cell = status[layout]
        assert cell["status"] == "ok"
        pos = cell["metrics"]["position"]
        assert pos["seq_len"] == 4 * 32 and len(pos["loss"]) == 4 and all(v is not None for v in pos["loss"])
        assert cell["metrics"]["val_loss_at_time_budget"] == cell["curve"][-1]["val_loss"]
        # the time axis: tokens / the layout's throughput measured side by side after the grid
        speed = res["speeds"][f"lm/32/{layout}"]
        assert len(speed["times_s"]) == 2 and speed["tokens_per_s"] == pytest.approx(4 * 32 / speed["step_s"])
        m = cell["metrics"]
        assert m["train_time_s"] == pytest.approx(m["tokens"] / speed["tokens_per_s"]) and m["logged_train_time_s"] > 0
    assert set(res["speeds"]) == {"lm/32/hybrid_nope", "lm/32/attn_rope"}  # not the failed cell
    md = (out / "results.md").read_text()
    assert "Failed cells" in md and "pos96-128" in md and "training tokens/s" in md
    for plot in ("loss_vs_tokens.png", "loss_vs_time.png", "loss_vs_position.png"):
        assert (out / plot).is_file()
    # a failed cell is not a finished one: the next run retries it
    cells, _ = study.plan_cells(load_spec(tmp_path / "spec.yaml"), out, build_data=False)
    by_layout = {c.layout: c for c in cells}
    assert by_layout["broken"].cell_id == status["broken"]["cell_id"]
    assert study.load_result(out, by_layout["broken"]) is None
    assert study.load_result(out, by_layout["attn_rope"])["status"] == "ok"
    # the speeds are measured once for the same finished cells: a rerun reuses speed.json
    speed_file = (out / "speed.json").stat().st_mtime_ns
    assert study.main(["--spec", str(write_spec(tmp_path, spec)), "--out", str(out)]) == 1
    assert (out / "speed.json").stat().st_mtime_ns == speed_file
