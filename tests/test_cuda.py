"""The pure-torch path on a CUDA GPU: what a CPU run cannot show. Skipped without CUDA.

- fp32 on the GPU equals fp32 on the CPU (logits, padded batches, cached greedy decode), every layout;
- torch.compile(fullgraph=True) with inductor (Triton kernels, not the graph-only backends of
  tests/test_compile.py): training loss and gradients, and generate() compiling its static-cache decode
  step itself, equal eager;
- QLoRA: an NF4 base on the GPU (bitsandbytes' CUDA kernels) trains its LoRA adapters and generates;
- FSDP2 through `accelerate launch` with the shipped trainers/accelerate/fsdp.yaml (NCCL, one process per
  GPU): the Mamba mixers' SSM parameters reach forward in fp32 under bf16 (tests/test_fsdp_mixed_precision.py's
  worker and checks), and a pretraining run writes sharded checkpoints and resumes from them.

The mamba-ssm / causal-conv1d kernels have their own file (tests/test_kernels.py); bf16 autocast on the GPU
runs in tests/test_mixed_precision.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, write_tiny_data
from test_compile import _grads

from hybrid_mamba.modeling import HybridMambaForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ["hybrid", "mamba2", "mamba1", "attention"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32: fp32 on the GPU is compared with fp32 on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(layout, **kw):
    """The same weights on the CPU and on the GPU, pure-torch path (no mamba-ssm kernels)."""
    cpu = HybridMambaForCausalLM(tiny_config(layout, use_mamba_kernels=False, **kw)).eval()
    gpu = HybridMambaForCausalLM(tiny_config(layout, use_mamba_kernels=False, **kw)).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_fp32_matches_cpu(layout):
    cpu, gpu = _pair(layout)
    ids = torch.randint(3, cpu.config.vocab_size, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    positions = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, -1)  # two packed documents
    with torch.no_grad():
        for kwargs in (
            dict(input_ids=ids),
            dict(input_ids=ids, attention_mask=mask),
            dict(input_ids=ids, position_ids=positions),
        ):
            want = cpu(**kwargs).logits
            got = gpu(**{k: v.cuda() for k, v in kwargs.items()}).logits.cpu()
            if "attention_mask" in kwargs:  # padded positions' logits are not compared
                want, got = want[mask.bool()], got[mask.bool()]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    want = cpu.generate(ids[:, :12], max_new_tokens=12, do_sample=False)
    got = gpu.generate(ids[:, :12].cuda(), max_new_tokens=12, do_sample=False)
    assert got.cpu().tolist() == want.tolist()


def test_inductor_fullgraph_training_matches_eager():
    torch._dynamo.reset()
    model = HybridMambaForCausalLM(tiny_config("hybrid", use_mamba_kernels=False)).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    ids = torch.randint(3, model.config.vocab_size, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, -1).cuda()
    for kwargs in (
        dict(input_ids=ids, labels=ids),
        dict(input_ids=ids, labels=ids, attention_mask=mask),
        dict(input_ids=ids, labels=ids, position_ids=positions),
    ):
        loss, grads = _grads(model, params, **kwargs)
        c_loss, c_grads = _grads(compiled, params, **kwargs)
        torch.testing.assert_close(c_loss, loss, atol=1e-4, rtol=1e-4)
        for g, cg in zip(grads, c_grads, strict=True):
            torch.testing.assert_close(cg, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("layout", ["hybrid", "mamba2"])
def test_generate_compiles_its_static_cache_step_with_inductor(layout):
    """On an accelerator generate() compiles the decode step itself (`_can_compile_fullgraph`, static cache)."""
    torch._dynamo.reset()
    model = HybridMambaForCausalLM(tiny_config(layout, use_mamba_kernels=False)).cuda().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 11), device="cuda")
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    compiled = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert compiled.tolist() == ref.tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_qlora_4bit_on_gpu_trains_and_generates(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from hybrid_mamba.trainers.peft_targets import resolve_targets
    from hybrid_mamba.trainers.qlora import linear_4bit_modules, load_4bit

    HybridMambaForCausalLM(tiny_config("hybrid", use_mamba_kernels=False)).save_pretrained(tmp_path / "base")
    model = load_4bit(HybridMambaForCausalLM, str(tmp_path / "base"), torch.bfloat16, device_map={"": 0})
    layers = linear_4bit_modules(model)
    assert layers and all(m.weight.device.type == "cuda" and isinstance(m.weight, bnb.nn.Params4bit) for _, m in layers)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=resolve_targets(model, None), init_lora_weights=False)
    )
    ids = torch.randint(3, model.config.vocab_size, (2, 24), device="cuda")
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora.values())
    reference = HybridMambaForCausalLM.from_pretrained(tmp_path / "base").cuda()
    with torch.no_grad():
        ref_loss = reference(input_ids=ids, labels=ids).loss
    assert abs(float(loss.detach()) - float(ref_loss)) < 0.3  # NF4 base + random LoRA init near the fp32 base
    model.eval()
    out = model.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 14)


def _launch(config: dict, tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({**config, "main_process_port": 29500 + os.getpid() % 1000}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), *args]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _fsdp_config() -> dict:
    cfg = yaml.safe_load((REPO / "trainers" / "accelerate" / "fsdp.yaml").read_text())
    return {**cfg, "num_processes": torch.cuda.device_count()}


@pytest.mark.slow
def test_fsdp2_bf16_keeps_ssm_parameters_fp32_on_gpu(tmp_path):
    from test_fsdp_mixed_precision import check_fsdp_mixed_precision

    out = tmp_path / "result.json"
    proc = _launch(_fsdp_config(), tmp_path, [str(REPO / "tests" / "test_fsdp_mixed_precision.py"), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cuda"
    check_fsdp_mixed_precision(result)


@pytest.mark.slow
def test_fsdp2_pretraining_checkpoints_and_resumes_on_gpu(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    from test_trainer import BASE  # the trainer tests' tiny run

    overrides = {**BASE["model_overrides"], "use_mamba_kernels": False}
    base = {**BASE, "data_dir": str(data), "output_dir": str(run), "model_overrides": overrides}
    for steps in (8, 12):  # the second run resumes from step 8's sharded checkpoint
        (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({**base, "max_steps": steps}))
        proc = _launch(
            _fsdp_config(),
            tmp_path,
            ["-m", "hybrid_mamba.trainers.pretrain", "--config", str(tmp_path / "pretrain.yaml")],
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert set(range(1, 13)) <= set(losses), sorted(losses)
    assert all(v == v and v < 10 for v in losses.values())
    assert "resum" in (proc.stdout + proc.stderr).lower()
    model = HybridMambaForCausalLM.from_pretrained(run / "final")
    assert next(model.parameters()).dtype == torch.float32
