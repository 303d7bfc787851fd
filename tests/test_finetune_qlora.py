"""QLoRA on CPU (bitsandbytes 0.50): what stays unquantized, and the eval-mode repack guard.

bitsandbytes repacks a 4-bit weight for a CPU inference kernel on the first eval-mode forward without
grad (on CPUs with AVX512-BF16); afterwards its matmul has no backward, so LoRA gradients are wrong or
None, and layers whose output size is not a multiple of 32 crash. trainers/qlora.py turns the repack
off; these tests fail if it stops doing so.
"""

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config

bnb = pytest.importorskip(
    "bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes, or the cuda extra)"
)

from peft import LoraConfig, get_peft_model

from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.trainers.peft_targets import resolve_targets
from hybrid_mamba.trainers.qlora import check_not_repacked, guard_cpu_repack, linear_4bit_modules, load_4bit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny bases: the hybrid (its Mamba-2 in_proj has 296 outputs, not a multiple of 32) and an
    attention-only one (every size a multiple of 32: the repack succeeds and gradients go silently wrong)."""
    root = tmp_path_factory.mktemp("qlora")
    for layout in ("hybrid", "attention"):
        torch.manual_seed(0)
        HybridMambaForCausalLM(tiny_config(layout)).save_pretrained(root / layout)
    return root


def qlora(path, guard=True):
    model = load_4bit(HybridMambaForCausalLM, str(path), torch.float32)
    if not guard:  # undo the guard, to show what it prevents
        for _, m in linear_4bit_modules(model):
            m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    torch.manual_seed(0)
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=resolve_targets(model, None), init_lora_weights=False)
    )


def lora_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}


def eval_forward(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_linear_layers_are_4bit_and_the_rest_is_not(saved):
    model = qlora(saved / "hybrid")
    quantized = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, _ in linear_4bit_modules(model)}
    assert quantized and all(n.endswith(("in_proj", "out_proj", "_proj")) for n in quantized)
    assert not any(n.endswith(("x_proj", "dt_proj", "lm_head")) for n in quantized)
    params = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}
    for suffix in ("A_log", "D", "dt_bias", "conv1d.weight", "x_proj.weight", "dt_proj.weight"):
        hits = [p for n, p in params.items() if n.endswith(suffix)]
        assert hits and all(p.dtype == torch.float32 for p in hits), suffix
    head = model.get_output_embeddings()  # tied to the embeddings, so not listed on its own
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32


@pytest.mark.parametrize("layout", ["hybrid", "attention"])
def test_guard_keeps_lora_gradients_after_an_eval_forward(saved, layout):
    model = qlora(saved / layout)
    ids = torch.randint(3, 512, (2, 11))
    before = lora_grads(model, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in before.values())
    logits = eval_forward(model, ids)  # the forward that repacks without the guard
    check_not_repacked(model)
    after = lora_grads(model, ids)
    for name, g in before.items():
        assert after[name] is not None, f"{name}: gradient is None after an eval-mode forward"
        torch.testing.assert_close(after[name], g, msg=f"{name}: gradient changed after an eval-mode forward")
    torch.testing.assert_close(eval_forward(model, ids), logits)


def test_without_the_guard_the_bug_shows(saved):
    """The control: proves the test above would catch a guard that stopped working (where the CPU repacks)."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    ids = torch.randint(3, 512, (2, 11))
    model = qlora(saved / "attention", guard=False)
    before = lora_grads(model, ids)
    eval_forward(model, ids)
    with pytest.raises(RuntimeError, match="repacked by bitsandbytes"):
        check_not_repacked(model)
    after = lora_grads(model, ids)
    assert any(after[n] is None or not torch.allclose(after[n], before[n]) for n in before)
    with pytest.raises(AssertionError, match="divisible by block_n"):  # the hybrid: a crash instead
        eval_forward(qlora(saved / "hybrid", guard=False), ids)
    assert guard_cpu_repack(model) == len(linear_4bit_modules(model))


def test_qlora_finetune_runs_with_evaluations(tmp_path, saved):
    """The entry point: evaluations between steps (each checked for repacking), adapter saved alone."""
    import json

    import yaml

    from hybrid_mamba.trainers import finetune
    from hybrid_mamba.trainers.demo_base import build_tokenizer

    AcceleratorState._reset_state(reset_partial_state=True)
    tok = build_tokenizer(512)
    base = tmp_path / "base"
    torch.manual_seed(0)
    HybridMambaForCausalLM(
        tiny_config("hybrid", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ).save_pretrained(base)
    tok.save_pretrained(base)
    conv = [
        {"messages": [{"role": "user", "content": f"{a} plus {a}?"}, {"role": "assistant", "content": str(2 * a)}]}
        for a in range(16)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conv))
    cfg = dict(
        base_model=str(base),
        output_dir=str(tmp_path / "run"),
        task="chat",
        adapter="qlora",
        train_file=str(data),
        validation_file=str(data),
        micro_batch_size=8,
        max_steps=4,
        warmup_steps=1,
        learning_rate=1e-2,
        eval_every=2,
        checkpoint_every=4,
        log_every=1,
        lora_r=4,
        lora_alpha=8,
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    summary = finetune.main(["--config", str(tmp_path / "c.yaml")])
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[3] < losses[2]  # still learning after the evaluation at step 2
    assert summary["finetune"]["adapter"] == "qlora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "run" / "final").iterdir()
    }


def test_importance_is_measured_through_4bit_weights(saved):
    """Rank allocation reads gradients from hooks, so a 4-bit base (whose weights have no .grad) works."""
    from hybrid_mamba.trainers.rank_allocation import measure_importance

    model = load_4bit(HybridMambaForCausalLM, str(saved / "hybrid"), torch.float32)
    targets = resolve_targets(model, None)
    ids = torch.randint(3, 512, (2, 11))
    spectra = measure_importance(model, [{"input_ids": ids, "labels": ids}], targets)
    four_bit = {n for n, _ in linear_4bit_modules(model)}
    assert four_bit and four_bit <= set(spectra) and all(s[0] > 0 for s in spectra.values())
    check_not_repacked(model)
