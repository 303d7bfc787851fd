"""hub_cards/quantize.py: dynamic int8, torchao int8 weight-only and bitsandbytes NF4 on CPU.

Tiny random-init models (tests/conftest.py), hybrid layout: a Mamba-2, an attention, a Mamba-1 (with
x_proj and dt_proj, skipped by default) and a Mamba-2 layer. A method whose package is not installed
is skipped with the reason.
"""

import json

import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.hub_cards import quantize as q
from hybrid_mamba.modeling import HybridMambaForCausalLM

# Largest relative RMS error of the logits against fp32 (||quantized - fp32|| / ||fp32||, a 2 x 24 batch),
# about 2.5 to 5 times what this model shows (int8 weight-only 0.011, dynamic int8 0.042, nf4 0.157).
# int8 weight-only rounds each weight to 1/255 of its row's range; dynamic int8 also rounds the
# activations, with one scale per tensor (the whole batch), so it is coarser; NF4 has 16 levels per
# block of 64 weights. Errors add up over the 4 layers of a model whose weights are random (no
# outliers that quantization would have learned around).
REL_TOLERANCE = {"int8-weight-only": 0.05, "dynamic-int8": 0.1, "nf4": 0.4}


def method_params(methods=q.METHODS):
    return [
        pytest.param(
            m,
            marks=pytest.mark.skipif(
                q.missing_package(m) is not None, reason=f"{m} needs {q.PACKAGES[m]}, which is not installed"
            ),
        )
        for m in methods
    ]


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    return HybridMambaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def model_dir(fp32_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32")
    fp32_model.save_pretrained(path)
    return path


def fresh_copy(model_dir):
    return HybridMambaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def ids(vocab, shape=(2, 24), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", method_params())
@torch.no_grad()
def test_linears_quantized_ssm_and_skipped_fp32_logits_close(method, fp32_model, model_dir):
    model = fresh_copy(model_dir)
    targets = [name for name, _ in q.quantizable_linears(model)]
    assert any(".mamba.in_proj" in n for n in targets) and any("self_attn.q_proj" in n for n in targets)
    assert not any(n.endswith(("x_proj", "dt_proj", "lm_head")) for n in targets)
    model = q.quantize(model, method)
    modules = dict(model.named_modules())
    assert [n for n in targets if not q.is_quantized(modules[n])] == []
    # what must stay fp32: the SSM parameters, conv1d and the skipped layers, all present in this layout
    assert q.fp32_problems(model) == []
    mamba1 = next(layer.mamba for layer in model.model.layers if hasattr(getattr(layer, "mamba", None), "x_proj"))
    for tensor in (mamba1.A_log, mamba1.D, mamba1.dt_proj.bias, mamba1.dt_proj.weight, mamba1.conv1d.weight):
        assert type(tensor) is torch.nn.Parameter and tensor.dtype == torch.float32
    assert type(mamba1.x_proj) is torch.nn.Linear and not q.is_quantized(mamba1.dt_proj)
    assert q.weight_bytes(model) < q.weight_bytes(fp32_model)
    x = ids(fp32_model.config.vocab_size)
    ref, out = fp32_model(x).logits, model(x).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < REL_TOLERANCE[method], rel


@pytest.mark.parametrize("method", method_params())
@torch.no_grad()
def test_greedy_generation_with_the_cache_matches_the_full_forward(method, model_dir):
    model = q.quantize(fresh_copy(model_dir), method)
    prompt = ids(model.config.vocab_size, (1, 10), seed=2)
    new = 6
    seq = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert seq.shape == (1, prompt.shape[1] + new)
    full = model(seq[:, :-1]).logits[0, prompt.shape[1] - 1 :]  # the logits each generated token came from
    generated = seq[0, prompt.shape[1] :]
    if method == "dynamic-int8":
        # activations are quantized with one scale per call: a decode step (one token) and the full
        # forward (every token) round them differently, so allow a near-tie to flip
        chosen = full.gather(-1, generated[:, None])[:, 0]
        assert (full.max(-1).values - chosen).max().item() < 0.02 * full.abs().max().item()
    else:
        assert torch.equal(full.argmax(-1), generated)


@pytest.mark.parametrize("method", method_params(q.SAVABLE))
@torch.no_grad()
def test_savable_methods_reload_to_the_same_logits(method, model_dir, tmp_path):
    loaded = q.load_quantized(model_dir, method)
    assert q.fp32_problems(loaded) == []
    x = ids(loaded.config.vocab_size)
    in_memory = q.quantize(fresh_copy(model_dir), method)
    torch.testing.assert_close(loaded(x).logits, in_memory(x).logits, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" in config
    reloaded = q.load_saved(tmp_path / "saved")
    modules = dict(reloaded.named_modules())
    assert all(q.is_quantized(modules[n]) for n, _ in q.quantizable_linears(fresh_copy(model_dir)))
    assert q.fp32_problems(reloaded) == []
    torch.testing.assert_close(reloaded(x).logits, loaded(x).logits, rtol=0, atol=0)


def test_dynamic_int8_loads_quantized_at_load_time(model_dir):
    model = q.load_quantized(model_dir, "dynamic-int8")
    assert q.is_quantized(model.model.layers[0].mamba.in_proj) and q.fp32_problems(model) == []
    assert "dynamic-int8" not in q.SAVABLE


def test_a_bad_method_is_one_clear_error(model_dir, fp32_model):
    with pytest.raises(
        q.QuantizeError, match="Unknown quantization method 'int4'.*dynamic-int8, int8-weight-only, nf4"
    ):
        q.quantize(fresh_copy(model_dir), "int4")
    with pytest.raises(q.QuantizeError, match="Unknown quantization method 'fp8'"):
        q.parse_args(q.QuantizeArgs, ["--model", str(model_dir), "--method", "dynamic-int8,fp8"])
    with pytest.raises(q.QuantizeError, match="No Linear layer left"):
        q.quantize(fresh_copy(model_dir), "dynamic-int8", skip=["model", "lm_head"])


def test_command_measures_writes_and_saves(model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    available = [m for m in q.METHODS if q.missing_package(m) is None]
    argv = ["--model", str(model_dir), "--eval", str(tiny_data), "--out", str(out), "--threads", "1"]
    argv += ["--decode_prompt", "8", "--decode_steps", "2", "--decode_reps", "1", "--prefill_len", "16"]
    argv += ["--prefill_reps", "1", "--eval_blocks", "2", "--eval_batch", "2"]
    results = q.main(argv)
    saved = json.loads((out / "quantize.json").read_text())
    assert list(saved["models"]) == ["fp32", *available]
    assert set(saved["not_run"]) == set(q.METHODS) - set(available)
    for name, r in saved["models"].items():
        assert r["decode_p50_s"] > 0 and r["prefill_median_s"] > 0 and len(r["decode_step_s"]) == 2
        assert r["quantized_linear"] == (0 if name == "fp32" else results["models"]["dynamic-int8"]["quantized_linear"])
        ev = saved["eval"]["models"][name]
        assert ev["perplexity"] > 1 and 0 <= ev["top1_agreement"] <= 1
    assert saved["eval"]["models"]["fp32"]["top1_agreement"] == 1.0 and saved["eval"]["blocks"] == 2
    for name in set(q.SAVABLE) & set(available):
        assert saved["saved"][name]["reload_max_abs_logit_diff"] == 0.0
        assert (out / name / "config.json").is_file()
    md = (out / "quantize.md").read_text()
    assert "| dynamic-int8 |" in md and "perplexity" in md
