"""FSDP2 with bf16 mixed precision (2 CPU processes over gloo): do the Mamba mixers' fp32 SSM parameters
(A_log, D, dt_bias; Mamba-1's dt_proj.bias) reach the mixer's forward in fp32?

accelerate's FSDP2 policy for `mixed_precision: bf16` is `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=bf16, output_dtype=bf16)` on each decoder-layer unit, so without help they arrive rounded to
bf16; trainers/fsdp_precision.py's `fp32_mamba_mixers` makes each mixer a unit of its own with fp32
parameters (its projections bf16 units inside it).

This file is also the worker: `accelerate launch` (trainers/accelerate/fsdp_cpu.yaml with bf16) runs it.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SSM_PARAMS = {"HybridMamba2Mixer": ("A_log", "D", "dt_bias"), "HybridMamba1Mixer": ("A_log", "D", "dt_proj.bias")}


def _worker(out_path: str) -> None:
    """Three preparations of the same tiny hybrid model in one accelerate FSDP2 run: accelerate's policy
    as is ("stock"), with `fp32_mamba_mixers` ("fixed"), and with it and `cpu_ram_efficient_loading`
    ("fixed_meta", rank 1 starting from other weights). Each runs one optimizer step and records what the
    mixers saw in forward, the loss and A_log's gradient."""
    import contextlib

    import torch
    from accelerate.utils import DistributedType

    from hybrid_mamba.configuration import get_preset
    from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM
    from hybrid_mamba.trainers.args import PretrainArgs
    from hybrid_mamba.trainers.fsdp_precision import MAMBA_MIXERS, fp32_mamba_mixers
    from hybrid_mamba.trainers.loop import make_accelerator, param_groups

    args = PretrainArgs(output_dir=str(Path(out_path).parent / "run"), mixed_precision="bf16")
    accelerator = make_accelerator(args)  # loop.py's accelerator: FSDP2 on CPU processes
    plugin = accelerator.state.fsdp_plugin
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": plugin.fsdp_version,
        "mixed_precision": accelerator.mixed_precision,
        "native_amp": accelerator.native_amp,
        "loop_policy": repr(plugin.mixed_precision_policy),
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
    }
    device_type = accelerator.device.type
    assert accelerator.distributed_type == DistributedType.FSDP
    # loop.py's CPU plugin gets the policy accelerate builds for an FSDP plugin on GPUs
    assert plugin.mixed_precision_policy is not None
    result["policy"] = repr(plugin.mixed_precision_policy)
    config = get_preset(
        "debug",
        layer_types=["mamba2", "attention", "mamba1", "mamba2"],
        num_hidden_layers=4,
        mamba_chunk_size=8,
    )
    ids = torch.randint(3, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    for mode in ("stock", "fixed", "fixed_meta", "whole"):
        plugin.cpu_ram_efficient_loading = mode == "fixed_meta"
        torch.manual_seed(0 if mode != "fixed_meta" else accelerator.process_index)
        model = HybridMambaForCausalLM(config)
        first_a_log = next(m for m in model.modules() if isinstance(m, MAMBA_MIXERS)).A_log.detach().clone()
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
        fix = fp32_mamba_mixers(accelerator, bf16_projections=mode != "whole")
        with fix if mode != "stock" else contextlib.nullcontext():
            model, optimizer = accelerator.prepare(model, optimizer)
        seen, seen_proj = [], []

        def record(mixer, _args):
            if len(seen) >= 3:  # the forward; activation checkpointing runs the mixers again in backward
                return
            kind = next(c.__name__ for c in MAMBA_MIXERS if isinstance(mixer, c))  # FSDP2 subclasses the mixer
            row = {"mixer": kind, "autocast": torch.is_autocast_enabled(device_type)}
            row["autocast_dtype"] = str(torch.get_autocast_dtype(device_type))
            for name in SSM_PARAMS[kind]:
                p = mixer.get_parameter(name)
                row[name] = str(p.dtype)
                # values a bf16 round trip leaves unchanged: all of them once rounded to bf16
                row[name + "_bf16_exact"] = bool(torch.equal(p.detach().float(), p.detach().bfloat16().float()))
            seen.append(row)

        def record_proj_weight(proj, _args):  # runs after FSDP2's pre-forward hook (the all-gather)
            if len(seen_proj) < 3:
                seen_proj.append({"weight": str(proj.weight.dtype)})

        def record_proj_output(proj, _args, output):  # after FSDP2's post-forward (its output cast)
            if "output" not in seen_proj[-1]:
                seen_proj[-1]["output"] = str(output.dtype)

        mixers = [m for m in model.modules() if isinstance(m, MAMBA_MIXERS)]
        hooks = [m.register_forward_pre_hook(record) for m in mixers]
        hooks += [m.in_proj.register_forward_pre_hook(record_proj_weight) for m in mixers]
        hooks += [m.in_proj.register_forward_hook(record_proj_output) for m in mixers]
        batch = ids.to(accelerator.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        for h in hooks:
            h.remove()
        a_log = mixers[0].A_log  # a DTensor shard
        grad = a_log.grad
        grad_norm = float(grad.full_tensor().float().norm()) if grad is not None else None
        before = a_log.full_tensor().detach().clone()
        optimizer.step()
        optimizer.zero_grad()
        after = a_log.full_tensor().detach()
        from torch.distributed.fsdp import FSDPModule

        result[mode] = {
            "seen": seen,
            "in_proj": seen_proj,
            "loss": float(loss),
            "a_log_dtype": str(a_log.dtype),
            "a_log_grad": grad_norm,
            "a_log_grad_dtype": str(grad.dtype) if grad is not None else None,
            "a_log_updated": not torch.equal(before, after),
            "a_log_matches_rank0": bool(torch.equal(before.cpu(), first_a_log)),  # read on rank 0
            "units": [  # FSDP2 units in each mixer: name -> param_dtype
                {
                    name or "mixer": str(sub._get_fsdp_state()._fsdp_param_group.mp_policy.param_dtype)
                    for name, sub in m.named_modules()
                    if isinstance(sub, FSDPModule)
                }
                for m in mixers
            ],
        }
        if mode == "fixed":  # the gathered full state dict (what _save_model writes): same names, fp32
            full = accelerator.get_state_dict(model)
            result[mode]["state_dict"] = sorted(full) == sorted(HybridMambaForCausalLM(config).state_dict())
            result[mode]["state_dict"] &= all(v.dtype == torch.float32 for v in full.values())
        accelerator.free_memory(model, optimizer)
    if accelerator.is_main_process:
        Path(out_path).write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()


@pytest.mark.slow
def test_mamba_ssm_parameters_stay_fp32_under_fsdp2_bf16(tmp_path):
    import subprocess

    cfg = yaml.safe_load((REPO / "trainers" / "accelerate" / "fsdp_cpu.yaml").read_text())
    cfg["mixed_precision"] = "bf16"  # as trainers/accelerate/fsdp.yaml
    cfg["main_process_port"] = 29500 + os.getpid() % 1000
    (tmp_path / "fsdp_cpu_bf16.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp_cpu_bf16.yaml")]
    cmd += [__file__, str(out)]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2 and result["device"] == "cpu"
    check_fsdp_mixed_precision(result)


def check_fsdp_mixed_precision(result: dict) -> None:
    """What the worker recorded, under any number of processes and on any device."""
    assert result["distributed_type"] == "DistributedType.FSDP" and result["fsdp_version"] == 2
    assert result["mixed_precision"] == "bf16" and result["native_amp"]
    assert "param_dtype=torch.bfloat16" in result["policy"]
    stock, fixed, meta, whole = result["stock"], result["fixed"], result["fixed_meta"], result["whole"]
    for run in (stock, fixed, meta, whole):
        assert [r["mixer"] for r in run["seen"]] == ["HybridMamba2Mixer", "HybridMamba1Mixer", "HybridMamba2Mixer"]
        # accelerate's FSDP2 path applies no autocast (it casts parameters instead), CPU or not
        assert not any(r["autocast"] for r in run["seen"])
        # one step runs, and A_log (fp32 master weights) gets a gradient and moves
        assert run["loss"] == run["loss"] and 3 < run["loss"] < 10
        assert run["a_log_dtype"] == "torch.float32" and run["a_log_grad"] and run["a_log_updated"]
    # accelerate's policy as is: the SSM parameters reach the mixers rounded to bf16
    for r in stock["seen"]:
        for name in SSM_PARAMS[r["mixer"]]:
            assert r[name] == "torch.bfloat16" and r[name + "_bf16_exact"], (name, r)
    assert stock["units"] == [{}, {}, {}]
    assert all(p == {"weight": "torch.bfloat16", "output": "torch.bfloat16"} for p in stock["in_proj"])
    # with fp32_mamba_mixers: in fp32 and unrounded (D starts at exactly 1), each mixer a unit in fp32 ...
    for run in (fixed, meta, whole):
        for r in run["seen"]:
            for name in SSM_PARAMS[r["mixer"]]:
                assert r[name] == "torch.float32", (name, r)
                assert name == "D" or not r[name + "_bf16_exact"], (name, r)
        assert run["a_log_grad_dtype"] == "torch.float32"
    # ... its projections bf16 units inside it (in_proj's output upcast for the fp32 conv and scan) ...
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    for run in (fixed, meta):
        m2 = {"mixer": fp32, "in_proj": bf16, "out_proj": bf16}
        assert run["units"] == [m2, {**m2, "x_proj": bf16}, m2]
        assert all(p == {"weight": bf16, "output": fp32} for p in run["in_proj"])
    # ... or, with bf16_projections=False, the whole mixer in fp32
    assert whole["units"] == [{"mixer": fp32}] * 3
    assert all(p == {"weight": fp32, "output": fp32} for p in whole["in_proj"])
    assert fixed["loss"] == pytest.approx(stock["loss"], abs=0.05)
    assert whole["loss"] == pytest.approx(stock["loss"], abs=0.05)
    # with cpu_ram_efficient_loading, rank 0's weights are the ones sharded (rank 1 started from others)
    assert meta["a_log_matches_rank0"]
    assert fixed["state_dict"]


if __name__ == "__main__":
    _worker(sys.argv[1])
