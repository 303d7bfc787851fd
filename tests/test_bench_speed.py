"""The speed benchmark runs end to end on tiny models and writes its JSON and markdown."""

import json

import pytest
import torch
from conftest import tiny_config
from transformers import StaticCache

from hybrid_mamba.eval_harness import bench_speed
from hybrid_mamba.eval_harness.bench_speed import MODEL_CLASSES, Plan, run_benchmark


@pytest.fixture
def in_process_memory(monkeypatch):
    """A spawned process per model costs seconds of imports each: run the memory worker in-process."""
    monkeypatch.setattr(
        bench_speed,
        "measure_training_memory",
        lambda columns, plan, threads, seed: {
            name: bench_speed._training_memory_worker(name, cfg, plan, threads, seed, mode)
            for name, (cfg, mode) in columns.items()
        },
    )


def test_bench_speed_writes_json_and_markdown(tmp_path, in_process_memory):
    plan = Plan(
        train_batch=1,
        train_seq=16,
        train_reps=1,
        memory_steps=1,
        prefill_lengths=(16, 24),
        prefill_reps=(1, 1),
        decode_prompts=(8,),
        decode_steps=3,
        decode_warmup=1,
        decode_batches=(2,),
        batched_decode_prompt=8,
    )
    out = tmp_path / "bench"
    run_benchmark(tiny_config(["mamba2", "attention"]), plan, out, threads=1, command="test")

    data = json.loads((out / "bench_speed.json").read_text())
    models = set(MODEL_CLASSES)
    assert {"command", "machine", "plan", "configs", "parameters", "training", "prefill", "decode", "memory"} <= set(
        data
    )
    assert {"cpu", "platform", "torch", "transformers", "threads", "date"} <= set(data["machine"])
    assert set(data["parameters"]) == models
    assert data["parameters"]["ours"] == data["parameters"]["bamba"]  # matched layout and sizes
    # the equal-size Llama is within one MLP column per layer of ours; the shape-matched one is not
    per_column = 3 * data["configs"]["llama"]["hidden_size"] * data["configs"]["llama"]["num_hidden_layers"]
    assert abs(data["parameters"]["llama"] - data["parameters"]["ours"]) <= per_column / 2
    assert data["configs"]["llama_shape"]["intermediate_size"] == data["configs"]["ours"]["intermediate_size"]
    assert set(data["training"]) == models and len(data["training"]["ours"]["tokens_per_s"]) == 1
    # a Llama's counted work is 6 FLOPs per linear weight per token (forward 2, backward 4) plus attention's
    cfg = data["configs"]["llama"]
    h, layers, vocab, kv = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["num_key_value_heads"]
    head = h // cfg["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv * head + 3 * h * cfg["intermediate_size"]) + h * vocab
    flops = data["training"]["llama"]["flops_per_token"]
    assert 6 * linear <= flops <= 6 * linear + layers * 6 * 2 * plan.train_seq * h, (flops, 6 * linear)
    assert data["training"]["ours"]["achieved_flops"] == pytest.approx(
        data["training"]["ours"]["flops_per_token"] * data["training"]["ours"]["median_tokens_per_s"]
    )
    assert set(data["prefill"]) == {"16", "24"} and set(data["prefill"]["24"]) == models
    assert "median_s" in data["prefill"]["16"]["bamba"]
    assert set(data["mamba_mixer"]) == {"16", "24"} and data["mamba_mixer"]["24"]["us_per_token"] > 0
    assert {"p50_s", "p95_s", "p99_s"} <= set(data["decode"]["8"]["llama"])
    assert len(data["decode"]["8"]["ours"]["step_s"]) == 3
    assert set(data["memory"]) == models and {"peak_over_build_mib", "peak_rss_mib"} <= set(data["memory"]["ours"])

    md = (out / "bench_speed.md").read_text()
    for title in (
        "## Parameters",
        "## Training step throughput",
        "## Training work per token",
        "## Prefill latency",
        "## Mamba mixer alone",
        "## Decode latency",
        "## Batched decode throughput",
        "## Training step peak memory",
    ):
        assert title in md
    assert "| ours | bamba | llama | llama_shape | ours/bamba | ours/llama | ours/llama_shape |" in md
    assert not list(out.glob("*.tmp"))


def test_bench_any_baselines_ttft_and_plot(tmp_path, in_process_memory):
    bench = bench_speed  # the --model entry point (once eval_harness.bench) is bench_speed's

    folder = tmp_path / "model"
    bench_speed.HybridMambaForCausalLM(tiny_config(["mamba2", "attention"])).save_pretrained(folder)
    config = bench.resolve_config(str(folder))
    assert config.layer_types == ["mamba2", "attention"]
    plan = Plan(
        train_batch=1,
        train_seq=16,
        train_reps=1,
        memory_steps=1,
        prefill_lengths=(16, 24),
        prefill_reps=(1, 1),
        decode_prompts=(8, 12),
        decode_steps=3,
        decode_warmup=1,
        decode_batches=(2,),
        batched_decode_prompt=8,
    )
    out = tmp_path / "bench"
    results = run_benchmark(config, plan, out, threads=1, command="test", baselines=("mamba2", "llama"), stem="bench")
    bench.plot(results, out / "bench.png")

    data = json.loads((out / "bench.json").read_text())
    assert list(data["parameters"]) == ["ours", "mamba2", "llama"]
    assert data["machine"]["device"] == "cpu" and data["machine"]["threads"] == 1
    assert data["decode"]["12"]["mamba2"]["ttft_s"] > 0 and len(data["decode"]["12"]["mamba2"]["step_s"]) == 3
    md = (out / "bench.md").read_text()
    assert "| ours | mamba2 | llama | ours/mamba2 | ours/llama |" in md and "## Time to first token" in md
    assert (out / "bench.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown baselines"):
        bench.run(bench.BenchArgs(model=str(folder), baselines="gpt2"))
    with pytest.raises(ValueError, match="neither a folder nor a preset"):
        bench.resolve_config("no-such-preset")


def test_bench_scan_quick_writes_reference_and_fast_rows(tmp_path):
    from hybrid_mamba.eval_harness import bench_scan

    bench_scan.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    data = json.loads((tmp_path / "bench_scan.json").read_text())
    ops = {(r["op"], r["mode"]) for r in data["rows"]}
    for op in ("ssd_scan_ref", "ssd_scan", "causal_conv1d_ref", "causal_conv1d"):
        assert (op, "forward") in ops and (op, "forward+backward") in ops
    assert all(r["median_ms"] > 0 for r in data["rows"])
    md = (tmp_path / "bench_scan.md").read_text()
    assert "| 1 x 128 | ssd_scan | 32 | forward+backward |" in md


def test_bench_modes_interleave_precision_and_compile(tmp_path, monkeypatch, in_process_memory):
    """--modes: every model in each mode, interleaved in one run; bf16 through autocast, +compile with a
    static cache for decode (traced with the eager backend here: same graphs, no C++ build)."""
    monkeypatch.setattr(bench_speed, "COMPILE_BACKEND", "eager")
    plan = Plan(
        train_batch=1,
        train_seq=16,
        train_reps=1,
        memory_steps=1,
        prefill_lengths=(16,),
        prefill_reps=(1,),
        decode_prompts=(8,),
        decode_steps=3,
        decode_warmup=1,
        decode_batches=(2,),
        batched_decode_prompt=8,
    )
    out = tmp_path / "bench"
    results = run_benchmark(
        tiny_config(["mamba2", "attention"]),
        plan,
        out,
        threads=1,
        command="test",
        baselines=("llama_shape",),
        modes=("fp32", "bf16", "fp32+compile"),
    )
    columns = ["ours", "llama_shape", "ours@bf16", "llama_shape@bf16", "ours@fp32+compile", "llama_shape@fp32+compile"]
    assert list(results["parameters"]) == columns and results["modes"] == ["fp32", "bf16", "fp32+compile"]
    assert set(results["training"]) == set(columns) == set(results["decode"]["8"]) == set(results["memory"])
    assert all(r["first_step_s"] > 0 for r in results["training"].values())
    assert set(results["batched_decode"]["2"]) == set(columns)
    assert all(r["tokens_per_s"] > 0 and len(r["step_s"]) == 3 for r in results["batched_decode"]["2"].values())
    md = (out / "bench_speed.md").read_text()
    ratios = "| ours/llama_shape | ours@bf16/llama_shape@bf16 | ours@fp32+compile/llama_shape@fp32+compile |"
    assert ratios + " ours@bf16/ours | ours@fp32+compile/ours |" in md
    assert "## First call (s, includes compilation" in md and "autocast to bfloat16" in md
    with pytest.raises(ValueError, match="choose one or more of"):
        bench_speed.BenchArgs(modes="fp16")


def test_bench_bf16_mode_autocasts_and_compiled_decode_matches_eager(monkeypatch):
    """The modes change how a model runs, not what it computes: bf16 logits (autocast) close to fp32's, and
    the compiled static-cache steps equal to the full forward."""
    monkeypatch.setattr(bench_speed, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    config = tiny_config(["mamba2", "attention"])
    ids = torch.randint(0, config.vocab_size, (1, 12))
    fp32 = bench_speed.build_model("ours", config, 0)
    bf16 = bench_speed.build_model("ours@bf16", config, 0)
    compiled = bench_speed.build_model("ours@fp32+compile", config, 0)
    with torch.no_grad():
        ref = fp32(input_ids=ids).logits
        low = bf16(input_ids=ids).logits
        assert low.dtype == torch.bfloat16  # the projections ran under autocast
        assert (low.float() - ref).abs().max() < 5e-2 * ref.abs().max()
        cache = StaticCache(config=config, max_cache_len=ids.shape[1])
        arg = bench_speed.cache_arg(compiled)
        compiled.eager_forward(input_ids=ids[:, :8], use_cache=True, **{arg: cache})
        for i in range(8, 12):
            out = compiled(
                input_ids=ids[:, i : i + 1], position_ids=torch.tensor([[i]]), use_cache=True, **{arg: cache}
            )
            torch.testing.assert_close(out.logits[:, -1], ref[:, i], atol=1e-5, rtol=1e-5)


def test_bench_onnx_decode_row(tmp_path, in_process_memory):
    """--onnx: ours exported and decoded by onnxruntime after the interleaved run, its logits checked."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    plan = Plan(
        train_batch=1,
        train_seq=16,
        train_reps=1,
        memory_steps=1,
        prefill_lengths=(16,),
        prefill_reps=(1,),
        decode_prompts=(8, 40),
        decode_steps=3,
        decode_warmup=1,
        decode_batches=(),
    )
    out = tmp_path / "bench"
    results = run_benchmark(
        tiny_config(["mamba2", "attention"]), plan, out, threads=1, command="test", baselines=("llama",), onnx=True
    )
    onnx = results["onnx_decode"]
    assert set(onnx) == {"export_s", "8", "40"} and len(onnx["40"]["step_s"]) == 3
    assert max(onnx[n]["max_abs_logit_diff"] for n in ("8", "40")) < 1e-4
    assert "## ONNX Runtime decode" in (out / "bench_speed.md").read_text()


def test_a_ratio_over_zero_is_a_dash_not_an_error():
    # a tiny model's training step can stay under the RSS it was built at: 0 MiB "over model"
    lines = bench_speed._table("t", "n", "row", [("over model", {"ours": 3.0, "llama_shape": 0.0})], ".0f")
    assert lines[-2].endswith("| - |")
    lines = bench_speed._table("t", "n", "row", [("over model", {"ours": 3.0, "llama_shape": 2.0})], ".0f")
    assert lines[-2].endswith("| 1.50 |")


def test_turn_order_puts_every_model_in_every_position_once_per_cycle():
    from hybrid_mamba.eval_harness.bench_speed import turn_order

    names = ("ours", "llama", "bamba")
    orders = [turn_order(names, i) for i in range(6)]
    assert orders[0] == names and orders[3] == names and all(sorted(o) == sorted(names) for o in orders)
    for position in range(3):
        assert sorted(o[position] for o in orders[:3]) == sorted(names)
    assert turn_order({"a": 1, "b": 2}, 1) == ("b", "a")  # a dict's keys
