"""trainers.plan: its arithmetic, its activation formulas against what autograd saves, and its CPU
predictions against the measured peak RSS of real training steps.

    python -m tests.test_plan       # prints the measured-vs-predicted table (from the repository root)
"""

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from hybrid_mamba.configuration import get_preset
from hybrid_mamba.configuration.param_counts import count_parameters
from hybrid_mamba.trainers import plan as planner
from hybrid_mamba.trainers.plan import GiB, MiB, PlanArgs, activation_bytes_per_token, estimate, min_gpus, search_fixes

REPO = Path(__file__).resolve().parents[1]

# Arithmetic


@pytest.fixture(scope="module")
def counts_13b():
    cfg = get_preset("13b")
    return cfg, count_parameters(cfg)


def plan_of(cfg_counts, **kw):
    cfg, counts = cfg_counts
    return estimate(PlanArgs(**{"preset": "13b", "gpu_memory": 24, **kw}), cfg, counts)


def test_sharding_divides_state_by_gpus(counts_13b):
    one, eight = plan_of(counts_13b, gpus=1), plan_of(counts_13b, gpus=8)
    p = counts_13b[1]["total"]
    assert one.peak.weights == pytest.approx(4 * p) and eight.peak.weights == pytest.approx(4 * p / 8)
    assert eight.peak.optimizer == pytest.approx(8 * p / 8)
    step1, step8 = one.phases[-1], eight.phases[-1]
    assert step8.gradients == pytest.approx(step1.gradients / 8) and step1.gradients == pytest.approx(4 * p)
    # Activations and unsharded FSDP units do not shrink with more GPUs.
    assert eight.phases[0].activations == one.phases[0].activations
    assert eight.phases[0].fsdp_buffers == one.phases[0].fsdp_buffers > 0


def test_offload_moves_state_to_host(counts_13b):
    on, off = plan_of(counts_13b, gpus=2, cpu_offload=True), plan_of(counts_13b, gpus=2)
    p = counts_13b[1]["total"]
    for b in on.phases:
        assert b.weights == b.gradients == b.optimizer == 0
    assert on.host_ram - off.host_ram == pytest.approx(16 * p)  # fp32 params + grads + AdamW moments
    assert on.peak.total < off.peak.total


def test_checkpointing_reduces_activations(counts_13b):
    plain = plan_of(counts_13b, gpus=2)
    ckpt = plan_of(counts_13b, gpus=2, activation_checkpointing=True)
    assert max(b.activations for b in ckpt.phases) < max(b.activations for b in plain.phases) / 5
    # What stays is one bf16 (B, T, D) input per layer plus one layer's recomputed tensors.
    cfg = counts_13b[0]
    inputs = cfg.num_hidden_layers * 2 * cfg.hidden_size * 2048
    assert max(b.activations for b in ckpt.phases) > inputs


def test_activations_scale_with_tokens(counts_13b):
    one = plan_of(counts_13b, micro_batch=1)
    two = plan_of(counts_13b, micro_batch=2)
    assert two.phases[0].activations == pytest.approx(2 * one.phases[0].activations)


def test_verdict_flips_at_the_boundary(counts_13b):
    need = plan_of(counts_13b, gpus=64, activation_checkpointing=True).peak.total / GiB
    assert plan_of(counts_13b, gpus=64, activation_checkpointing=True, gpu_memory=need * 1.0001).fits
    below = plan_of(counts_13b, gpus=64, activation_checkpointing=True, gpu_memory=need * 0.9999)
    assert not below.fits and below.margin < 0


def test_13b_on_two_24gb_gpus_needs_offload(counts_13b):
    cfg, counts = counts_13b
    args = PlanArgs(preset="13b", gpus=2, gpu_memory=24)
    plan = estimate(args, cfg, counts)
    assert not plan.fits
    # 16 bytes/parameter of state alone exceed 2 x 24 GiB.
    assert 16 * counts["total"] > 2 * 24 * GiB
    fixes = search_fixes(args, cfg, counts)
    assert fixes and all("CPU offload" in name for name, _ in fixes) and all(p.fits for _, p in fixes)
    assert all(p.host_ram > 16 * counts["total"] for _, p in fixes)
    n = min_gpus(dataclasses.replace(args, activation_checkpointing=True), cfg, counts)
    assert (
        n is not None
        and not estimate(dataclasses.replace(args, gpus=n - 1, activation_checkpointing=True), cfg, counts).fits
    )


def test_time_from_throughput_and_mfu():
    cfg = get_preset("tiny")
    t = planner.training_time(PlanArgs(preset="tiny", tokens=1e9, tokens_per_s=1e5), cfg)
    assert t["seconds"] == pytest.approx(1e4)
    from hybrid_mamba.modeling import HybridMambaForCausalLM
    from hybrid_mamba.trainers.loop import flops_per_token

    with torch.device("meta"):
        fpt = flops_per_token(HybridMambaForCausalLM(cfg), 512)
    t = planner.training_time(PlanArgs(preset="tiny", seq_len=512, gpus=4, tokens=1e9, mfu=0.5, peak_tflops=100), cfg)
    assert t["tokens_per_s"] == pytest.approx(0.5 * 100e12 * 4 / fpt)
    assert t["gpu_hours"] == pytest.approx(t["seconds"] * 4 / 3600)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="--gpus"):
        PlanArgs(preset="tiny", gpus=0)
    with pytest.raises(ValueError, match="--device cpu"):
        PlanArgs(preset="tiny", device="cpu", gpus=2)
    with pytest.raises(ValueError, match="--mfu and --peak-tflops"):
        PlanArgs(preset="tiny", mfu=0.4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        estimate(PlanArgs(preset="debug", seq_len=4096))


def test_cli_prints_the_plan_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    result = planner.main(
        [
            "--preset",
            "debug",
            "--gpus",
            "2",
            "--gpu-memory",
            "2",
            "--micro-batch",
            "64",
            "--seq-len",
            "1024",
            "--tokens",
            "1e8",
            "--tokens-per-s",
            "1e4",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "What fits instead" in text and "Time for 1e+08 tokens" in text
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["fixes"] and result["time"]["seconds"] == pytest.approx(1e4)


# Activation formulas against the tensors autograd saves


def saved_bytes(model, ids, position_ids) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    "mamba_version, precision, packed",
    [
        (2, "fp32", False),
        (2, "fp32", True),
        (2, "bf16", False),
        (2, "bf16", True),
        (1, "fp32", False),
        (1, "bf16", True),
    ],
)
def test_activation_formulas_match_saved_tensors(mamba_version, precision, packed):
    b, t = 2, 96  # 3 Mamba-2 chunks of 32 on the debug preset, 2 Mamba-1 chunks (64 + 32)
    cfg = get_preset("debug", mamba_version=mamba_version)
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    model = HybridMambaForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    pos = packed_positions(b, t) if packed else None
    a = planner.COMPUTE_BYTES[precision]
    if precision == "bf16":  # FSDP2's bf16 parameters under autocast
        model = model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured = saved_bytes(model, ids, pos)
    else:
        measured = saved_bytes(model, ids, pos)
    predicted = sum(
        activation_bytes_per_token(cfg, cfg.mixer_type(i), t, a, packed)[0] for i in range(cfg.num_hidden_layers)
    )
    predicted += cfg.num_hidden_layers * activation_bytes_per_token(cfg, "mlp", t, a, packed)[0]
    predicted += activation_bytes_per_token(cfg, "head", t, a, packed)[0]
    assert predicted * b * t == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("mamba_version", [1, 2])
def test_a_pruned_models_activations_and_units_follow_its_per_layer_widths(mamba_version):
    """Widths per layer (a pruned model): the formulas read each layer's own MLP and Mamba widths, and the
    planner's FSDP units are that layer's parameters, not the global widths'."""
    b, t = 2, 96
    cfg = get_preset(
        "debug",
        mamba_version=mamba_version,
        intermediate_size_per_layer=[128, 0, 48, 96],
        mamba_d_inner_per_layer=[64, 128, 0, 32],
    )
    from hybrid_mamba.modeling import HybridMambaForCausalLM

    model = HybridMambaForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    measured = saved_bytes(model, ids, None)
    predicted = activation_bytes_per_token(cfg, "head", t, 4, False)[0]
    for i in range(cfg.num_hidden_layers):
        predicted += activation_bytes_per_token(cfg, cfg.mixer_type(i), t, 4, False, layer_idx=i)[0]
        if cfg.layer_intermediate_size(i):
            predicted += activation_bytes_per_token(cfg, "mlp", t, 4, False, layer_idx=i)[0]
    assert predicted * b * t == pytest.approx(measured, rel=0.03)

    layers, root = planner.layer_parameters(cfg, count_parameters(cfg))
    mixers = [layer.self_attn if layer.mixer_type == "attention" else layer.mamba for layer in model.model.layers]
    mlps = [list(layer.mlp.parameters()) if layer.mlp is not None else [] for layer in model.model.layers]
    assert layers == [sum(p.numel() for p in m.parameters()) + sum(p.numel() for p in w) for m, w in zip(mixers, mlps)]
    assert root + sum(layers) == sum(p.numel() for p in model.parameters())
    # the whole plan: smaller than the unpruned model's at the same setting
    args = PlanArgs(preset="debug", micro_batch=2, seq_len=96, gpus=1)
    full = estimate(args, get_preset("debug", mamba_version=mamba_version))
    assert estimate(args, cfg).peak.activations < full.peak.activations


# CPU predictions against measured peak RSS

# (preset, micro-batch, seq-len, activation checkpointing, packed documents): 3-10 s each on one
# thread. Sizes where activations are hundreds of MiB: the runtime's own share of the peak (code
# pages and allocator state touched during the first steps) differs by about 20 MiB between two
# venvs of the same packages on this machine, too much against tens of MiB of activations.
MEASURED_CASES = [
    ("debug", 8, 1024, False, False),
    ("debug", 16, 1024, True, False),
    ("tiny", 2, 512, False, True),
    ("tiny", 4, 512, True, True),
]
TOLERANCE = 0.15


def packed_positions(b: int, t: int) -> torch.Tensor:
    """position_ids of rows packing documents of t/2 + 3 tokens, so each row holds a boundary."""
    return (torch.arange(t) % (t // 2 + 3)).repeat(b, 1)


def _measure_in_child(preset, micro_batch, seq_len, checkpointing, packed, threads=1) -> dict:
    """In a freshly forked process: RSS after building model and AdamW, and the peak over 2 training steps.

    The step is the loop's: forward with labels, backward, gradient clipping, AdamW over the loop's
    parameter groups, zero_grad(set_to_none); the second step is the first with AdamW state allocated.
    """
    from hybrid_mamba.eval_harness.bench_speed import _maxrss_bytes, _rss_bytes, random_ids
    from hybrid_mamba.modeling import HybridMambaForCausalLM
    from hybrid_mamba.trainers.loop import param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HybridMambaForCausalLM(get_preset(preset)).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    ids = random_ids(model.config.vocab_size, (micro_batch, seq_len), 0)
    pos = packed_positions(micro_batch, seq_len) if packed else None
    after_build, files_after_build = _rss_bytes(), _file_rss_bytes()
    for _ in range(2):
        model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _maxrss_bytes()
    # Library code the steps map in (libtorch's backward kernels) is resident too, by an amount that depends
    # on the page cache (25-75 MiB seen here): file pages, reclaimable, not what the plan models. They stay
    # mapped, so their growth by the end is their growth at the peak.
    code = _file_rss_bytes() - files_after_build
    return {
        "peak_over_build_mib": (peak - after_build - code) / MiB,
        "rss_after_build_mib": after_build / MiB,
        "peak_rss_mib": peak / MiB,
        "code_pages_mib": code / MiB,
    }


def _file_rss_bytes() -> int:
    """File-backed resident memory (RssFile in /proc/self/status): mapped libraries and files."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def _measure_all(cases: list) -> list[dict]:
    """Runs in a fresh interpreter that has imported torch and the model once: one fork per case.

    A forked child starts with ru_maxrss at its own RSS (not the parent's peak), so each peak is
    that case's alone, without paying the imports again.
    """
    results = []
    for case in cases:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: whatever happens, it must not return into this loop
            os.close(read)
            try:
                with os.fdopen(write, "wb") as f:
                    f.write(json.dumps(_measure_in_child(*case)).encode())
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"measuring {case} failed (wait status {status}); its traceback is above.")
        results.append(json.loads(data))
    return results


def measure(cases: list) -> list[dict]:
    """Peak RSS over build for each case, measured in a fresh interpreter (see `_measure_all`).

    glibc's malloc is pinned to mmap blocks of 64 KiB and more (MALLOC_MMAP_THRESHOLD_), so freed tensors
    go back to the OS and RSS follows the live tensors, the quantity the plan models. With glibc's default
    dynamic threshold, blocks of up to 32 MiB that were freed stay in the heap and the peak RSS reads
    higher by a pattern-dependent amount (allocator fragmentation, which on GPUs the plan's FRAGMENTATION
    term covers).
    """
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, __file__, json.dumps(cases)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_over_build_mib(preset, micro_batch, seq_len, checkpointing, packed) -> float:
    """The plan for --device cpu --precision fp32, less the weights (already resident after the build)."""
    args = PlanArgs(
        preset=preset,
        device="cpu",
        precision="fp32",
        micro_batch=micro_batch,
        seq_len=seq_len,
        activation_checkpointing=checkpointing,
        packed=packed,
        gpu_memory=64,
    )
    plan = estimate(args)
    return (plan.peak.total - plan.peak.weights) / MiB


def comparison_table(cases=MEASURED_CASES) -> tuple[list[dict], str]:
    rows = []
    for case, m in zip(cases, measure(cases), strict=True):
        pred = predicted_over_build_mib(*case)
        rows.append(
            {
                "case": case,
                "measured_mib": m["peak_over_build_mib"],
                "predicted_mib": pred,
                "ratio": pred / m["peak_over_build_mib"],
                **m,
            }
        )
    lines = [
        "| preset | micro-batch x seq-len | checkpointing | packed | measured MiB | predicted MiB | predicted/measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, b, t, ckpt, packed = r["case"]
        lines.append(
            f"| {p} | {b} x {t} | {'yes' if ckpt else 'no'} | {'yes' if packed else 'no'} | "
            f"{r['measured_mib']:.0f} | {r['predicted_mib']:.0f} | {r['ratio']:.3f} |"
        )
    return rows, "\n".join(lines)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and glibc's MALLOC_MMAP_THRESHOLD_")
def test_cpu_prediction_matches_measured_peak_rss():
    rows, table = comparison_table()
    print("\n" + table)
    for r in rows:
        assert r["peak_rss_mib"] > r["rss_after_build_mib"], f"{r['case']}: no growth measured"
        assert abs(r["ratio"] - 1) <= TOLERANCE, f"{r['case']}: predicted/measured {r['ratio']:.3f}\n{table}"


if __name__ == "__main__":
    if len(sys.argv) > 1:  # the measurement process started by `measure`
        import hybrid_mamba.eval_harness.bench_speed
        import hybrid_mamba.modeling
        import hybrid_mamba.trainers.loop  # noqa: F401

        print(json.dumps(_measure_all(json.loads(sys.argv[1]))))
    else:
        print(comparison_table()[1])
