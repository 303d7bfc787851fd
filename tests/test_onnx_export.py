"""torch.export and ONNX export of the prefill chunk and the decode step (hub_cards.onnx_export).

Tiny random models: Mamba-2 with a RoPE GQA attention layer, and Mamba-1 with a NoPE attention layer.
The exported programs (traced at batch 2, past length 5) run at other batch sizes and past lengths
(0 included: the first chunk of a prompt) against the eager model: its full forward over the whole
sequence, and its own cached decoding. The ONNX tests need onnx, onnxscript and onnxruntime
(`pip install -e ".[onnx]"`) and are skipped without them.
"""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.common.cli import run_main
from hybrid_mamba.hub_cards import onnx_export
from hybrid_mamba.hub_cards.onnx_export import (
    ExportStep,
    OnnxExportError,
    empty_states,
    export_program,
    state_specs,
)
from hybrid_mamba.modeling.modeling_hybrid_mamba import HybridMambaForCausalLM, _cache_of

TOL = 1e-4  # fp32; measured differences are ~1e-6 (torch.export) and ~5e-7 (onnxruntime)
CHUNK = 8  # prefill chunk length of the exports here
LAYOUTS = {
    "mamba2-rope": dict(layout=["mamba2", "attention", "mamba2", "mamba2"]),
    "mamba1-nope": dict(layout=["mamba1", "attention", "mamba1", "mamba1"], position_embedding_type="none"),
}


def tiny_model(layout=LAYOUTS["mamba2-rope"]["layout"], **overrides) -> HybridMambaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(layout, **overrides)
    config._attn_implementation = "sdpa"
    return HybridMambaForCausalLM(config).eval()


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.fixture(scope="module", params=list(LAYOUTS))
def programs(request):
    model = tiny_model(**LAYOUTS[request.param])
    return model, export_program(model, tokens=CHUNK), export_program(model, tokens=1)


def test_state_specs_cover_every_layer():
    model = tiny_model()
    specs = state_specs(model)
    assert [s.name for s in specs] == [
        "conv_0", "ssm_0", "key_1", "value_1", "conv_2", "ssm_2", "conv_3", "ssm_3"
    ]  # fmt: skip
    mixer = model.model.layers[0].mamba
    assert specs[0].shape == ("batch", mixer.conv_dim, 4) and specs[1].shape == ("batch", 8, 16, 16)
    assert specs[2].shape == ("batch", 2, "past", 16)


def test_exported_steps_match_eager(programs):
    """Chunks from an empty cache, a second chunk, then decode steps, at batch 3: the logits of the full
    forward over the whole sequence and the eager model's own cached decoding."""
    model, prefill, decode = programs
    prefill, decode = prefill.module(), decode.module()
    ids = torch.randint(0, 128, (3, 2 * CHUNK + 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        eager = model(input_ids=ids[:, : 2 * CHUNK], use_cache=True)
        cache, eager_steps = _cache_of(eager), [eager.logits]
        for j in range(2 * CHUNK, ids.shape[1]):
            out = model(input_ids=ids[:, j : j + 1], cache=cache, use_cache=True)
            cache = _cache_of(out)
            eager_steps.append(out.logits)
        eager_logits = torch.cat(eager_steps, dim=1)

        states, logits = empty_states(model, 3), []
        for s in (0, CHUNK):
            out, *states = prefill(ids[:, s : s + CHUNK], *states)
            logits.append(out)
        for j in range(2 * CHUNK, ids.shape[1]):
            out, *states = decode(ids[:, j : j + 1], *states)
            logits.append(out)
        logits = torch.cat(logits, dim=1)
    assert logits.shape == full.shape
    assert max_diff(logits, full) < TOL
    assert max_diff(logits, eager_logits) < TOL
    # the attention cache grew by every token, the Mamba states keep their shapes
    key = states[[s.kind for s in state_specs(model)].index("key")]
    assert key.shape[2] == ids.shape[1]


def test_export_step_is_the_model_itself():
    """ExportStep (eager) with empty states equals the model's forward: nothing of the math is copied."""
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        logits, *_ = ExportStep(model)(ids, *empty_states(model, 2))
        assert max_diff(logits, model(input_ids=ids).logits) < 1e-6


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(OnnxExportError, match="no such folder"):
        onnx_export.OnnxExportArgs(model=str(tmp_path / "missing"), out=str(tmp_path / "o"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OnnxExportError, match="model_type is 'llama'"):
        onnx_export.OnnxExportArgs(model=str(tmp_path / "other"), out=str(tmp_path / "o"))
    with pytest.raises(OnnxExportError, match="--prefill_len"):
        onnx_export.OnnxExportArgs(model=str(tmp_path / "other"), out=str(tmp_path / "o"), prefill_len=1)
    with pytest.raises(OnnxExportError, match="tokens"):
        export_program(tiny_model(), tokens=0)


def test_bad_model_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(onnx_export.main, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --model")
    assert not (tmp_path / "out").exists()


# ONNX through onnxruntime


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[onnx]'")
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_model()
    model.save_pretrained(root / "model")
    out = root / "out"
    manifest = onnx_export.main(["--model", str(root / "model"), "--out", str(out), "--prefill_len", str(CHUNK)])
    return model, out, manifest


def test_command_writes_the_files(exported):
    model, out, manifest = exported
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "onnx_export.json", "prefill.onnx"]
    assert json.loads((out / "onnx_export.json").read_text()) == manifest
    assert manifest["prefill"]["tokens"] == CHUNK and manifest["decode"]["tokens"] == 1
    assert [s["name"] for s in manifest["states"]] == [s.name for s in state_specs(model)]
    names = [i["name"] for i in manifest["decode"]["inputs"]]
    assert names[0] == "input_ids" and names[1:] == [s["name"] for s in manifest["states"]]
    assert manifest["decode"]["outputs"][0]["name"] == "logits"
    assert manifest["check_max_abs_diff"] < TOL
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "onnxscript"}
    assert isinstance(manifest["opset"], int)


@pytest.mark.parametrize("batch, prompt", [(1, CHUNK + 3), (4, 2 * CHUNK), (2, 3)])
def test_onnxruntime_matches_torch(exported, batch, prompt):
    """Other batch sizes and past lengths than traced: logits of the prompt (chunks, then decode steps
    for the remainder) and of five decode steps after it equal the full forward."""
    model, out, _ = exported
    gen = onnx_export.OnnxGenerator(out)
    ids = torch.randint(0, 128, (batch, prompt + 5), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    logits = gen.forward_logits(ids[:, :prompt].numpy(), ids[:, prompt:].numpy())
    assert logits.shape == tuple(full.shape)
    assert max_diff(logits, full) < TOL


def test_onnxruntime_matches_torch_export(exported):
    model, out, _ = exported
    gen = onnx_export.OnnxGenerator(out)
    decode = export_program(model, tokens=1).module()
    ids = torch.randint(0, 128, (3, 1))
    states = [torch.randn_like(s) for s in empty_states(model, 3, past=6)]
    with torch.no_grad():
        ref = decode(ids, *states)
    logits, new = gen.step(ids.numpy(), [s.numpy() for s in states])
    for a, b in zip([logits, *new], ref):
        assert a.shape == tuple(b.shape)
        assert max_diff(a, b) < TOL


def test_greedy_generation_matches_generate(exported):
    model, out, _ = exported
    gen = onnx_export.OnnxGenerator(out, threads=1)
    ids = torch.randint(0, 128, (2, CHUNK + 2), generator=torch.Generator().manual_seed(3))
    cfg = model.generation_config
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    tokens = gen.generate(ids, 12, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    np.testing.assert_array_equal(tokens, ref.numpy())
    assert gen.last_timings["decode_steps"] == tokens.shape[1] - ids.shape[1] - 1


def test_mamba1_nope_onnx(tmp_path):
    """The Mamba-1 / NoPE layout through the whole export (its check run compares onnxruntime with torch)
    and greedy generation."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[onnx]'")
    model = tiny_model(**LAYOUTS["mamba1-nope"])
    model.save_pretrained(tmp_path / "model")
    manifest = onnx_export.export_onnx(tmp_path / "model", tmp_path / "out", prefill_len=CHUNK)
    assert manifest["check_max_abs_diff"] < TOL
    assert [s["shape"] for s in manifest["states"][:2]] == [["batch", 128, 4], ["batch", 128, 16]]
    ids = torch.randint(0, 128, (3, CHUNK + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    cfg = model.generation_config
    tokens = onnx_export.OnnxGenerator(tmp_path / "out").generate(
        ids, 6, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    np.testing.assert_array_equal(tokens, ref.numpy())
