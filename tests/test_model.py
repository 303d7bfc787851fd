"""Behaviour of the model on CPU: cache, padding, packing, generation, gradients, save/load."""

import json

import pytest
import torch
from conftest import LAYOUTS, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

from hybrid_mamba.modeling import HybridMambaForCausalLM, HybridMambaForSequenceClassification, HybridMambaModel

ALL_LAYOUTS = list(LAYOUTS)
# Behaviour tests run on both operator sets: the fast operators and the references they are tested against.
MAMBA_OPS = ["fast", "reference"]


def model_for(layout, **kw):
    return HybridMambaForCausalLM(tiny_config(layout, **kw)).eval()


def ids(b=2, t=21, vocab=512):
    return torch.randint(3, vocab, (b, t))


@pytest.mark.parametrize("mamba_ops", MAMBA_OPS)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_cached_decode_equals_full_forward(layout, mamba_ops):
    m, x = model_for(layout, mamba_ops=mamba_ops), ids()
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        out = m(x[:, :13], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for i in range(13, x.shape[1]):
            out = m(x[:, i : i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # a multi-token continuation from a cache (chunked prefill) too
        first = m(x[:, :6], use_cache=True)
        rest = m(x[:, 6:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_cache_is_built_per_layer_from_the_config():
    m = model_for("hybrid")
    cache = DynamicCache(config=m.config)
    assert cache.is_linear == [True, False, True, True]
    with torch.no_grad():
        m(ids(1, 9), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 9


def test_mamba_state_does_not_grow_with_context():
    m = model_for("mamba2")
    sizes = []
    with torch.no_grad():
        for t in (8, 40):
            cache = m(ids(1, t), use_cache=True).past_key_values
            sizes.append(
                [
                    (c.shape, r.shape)
                    for c, r in zip(cache.layers[0].conv_states.values(), cache.layers[0].recurrent_states.values())
                ]
            )
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("mamba_ops", MAMBA_OPS)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_left_padded_batch_equals_rows_alone(layout, mamba_ops):
    m, x = model_for(layout, mamba_ops=mamba_ops), ids(3, 17)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    mask[2, :12] = 0  # shorter than the conv width after decoding starts
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        batch = m(x, attention_mask=mask).logits
        gen = m.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row in range(3):
            start = int((mask[row] == 0).sum())
            alone = m(x[row : row + 1, start:]).logits
            torch.testing.assert_close(batch[row, start:], alone[0], atol=1e-5, rtol=1e-5)
            gen_alone = m.generate(x[row : row + 1, start:], max_new_tokens=6, do_sample=False)
            assert gen[row, 17:].tolist() == gen_alone[0, 17 - start :].tolist()


@pytest.mark.parametrize("mamba_ops", MAMBA_OPS)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_row_equals_documents_alone(layout, use_cache, mamba_ops):
    m, x = model_for(layout, mamba_ops=mamba_ops), ids(1, 30)
    lengths = [9, 4, 17]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = m(x, position_ids=pos, use_cache=use_cache).logits
        start = 0
        for n in lengths:
            alone = m(x[:, start : start + n]).logits
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_generation_modes():
    m, x = model_for("hybrid"), ids(2, 7)
    with torch.no_grad():
        greedy = m.generate(x, max_new_tokens=8, do_sample=False)
        no_cache = m.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
        assert greedy.tolist() == no_cache.tolist()
        beams = m.generate(x, max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
        assert beams.shape == (4, 15)
        torch.manual_seed(1)
        sampled = m.generate(x, max_new_tokens=8, do_sample=True, top_k=20, temperature=1.5)
        assert sampled.shape == (2, 15)


def test_beam_search_matches_uncached_scoring():
    m, x = model_for("hybrid"), ids(1, 6)
    with torch.no_grad():
        out = m.generate(
            x, max_new_tokens=5, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        seq = out.sequences
        # the returned beam's score is its summed log-probability under a full forward
        logp = torch.log_softmax(m(seq, use_cache=False).logits[0, 5:-1], -1)
        total = logp.gather(-1, seq[0, 6:, None]).sum()
        torch.testing.assert_close(out.sequences_scores[0] * 5, total, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_fast_and_reference_ops_agree(packed):
    """The fast operators against the references, through a whole hybrid model: logits and every
    parameter's gradient (fp32), on a plain batch and on packed rows."""
    fast = model_for("hybrid").train()
    ref = model_for("hybrid", mamba_ops="reference").train()
    ref.load_state_dict(fast.state_dict())
    assert fast.model.layers[0].mamba.ops.ssd_scan is not ref.model.layers[0].mamba.ops.ssd_scan
    x = ids(2, 29)
    pos = torch.cat([torch.arange(11), torch.arange(18)])[None].expand(2, -1) if packed else None
    outs = {}
    for name, m in (("fast", fast), ("reference", ref)):
        out = m(x, position_ids=pos, labels=x)
        out.loss.backward()
        outs[name] = out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}
    torch.testing.assert_close(outs["fast"][0], outs["reference"][0], atol=1e-4, rtol=1e-4)
    for name, grad in outs["reference"][1].items():
        torch.testing.assert_close(outs["fast"][1][name], grad, atol=1e-4, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_mamba_ops_is_saved_and_old_configs_default_to_fast(tmp_path):
    m = model_for("hybrid", mamba_ops="reference")
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mamba_ops"] == "reference"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mamba.ops is m.model.layers[0].mamba.ops
    del config["mamba_ops"]  # a config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(tmp_path).mamba_ops == "fast"
    with pytest.raises(ValueError, match="mamba_ops must be one of"):
        tiny_config("hybrid", mamba_ops="triton")


def test_loss_ignores_minus_100():
    m, x = model_for("hybrid"), ids(2, 12)
    labels = x.clone()
    labels[0, :4] = -100
    out = m(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("mamba_ops", MAMBA_OPS)
def test_gradient_checkpointing_gives_same_gradients(mamba_ops):
    m = model_for("hybrid", mamba_ops=mamba_ops).train()
    x = ids(2, 19)

    def grads():
        m.zero_grad()
        m(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(m.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mamba_ops", MAMBA_OPS)
def test_every_parameter_gets_a_gradient(mamba_ops):
    m = model_for("hybrid", mamba_ops=mamba_ops).train()
    x = ids(2, 19)
    m(x, labels=x).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_ssm_parameters_fp32_and_tagged(tmp_path):
    m = model_for("hybrid")
    tagged = m.no_weight_decay_parameter_names()
    assert tagged and all(n.rsplit(".", 1)[-1] in {"A_log", "D", "dt_bias"} for n in tagged)
    assert {n.rsplit(".", 1)[-1] for n in tagged} == {"A_log", "D", "dt_bias"}
    m.save_pretrained(tmp_path)
    bf16 = HybridMambaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = [n for n, p in bf16.named_parameters() if p.dtype == torch.float32]
    for name, p in bf16.named_parameters():
        # Mamba-1 keeps its timestep bias (dt_proj.bias) in fp32 as Mamba-2 keeps dt_bias
        keep = name.rsplit(".", 1)[-1] in {"A_log", "D", "dt_bias"} or name.endswith("mamba.dt_proj.bias")
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), name
    assert any(n.endswith("dt_proj.bias") for n in fp32) and any(n.endswith("dt_bias") for n in fp32)
    with torch.no_grad():
        out = bf16(ids(1, 9)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_load_round_trip_is_exact(tmp_path):
    m = model_for("hybrid")
    m.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_hybrid_mamba.py", "modeling_hybrid_mamba.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid_mamba.HybridMambaForCausalLM"
    assert "dtype" in config and "torch_dtype" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridMambaForCausalLM
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = ids()
    with torch.no_grad():
        assert torch.equal(m(x).logits, loaded(x).logits)


def test_auto_classes():
    cfg = tiny_config("hybrid")
    assert (
        type(AutoConfig.for_model("hybrid_mamba", hidden_size=64, num_attention_heads=4)).__name__
        == "HybridMambaConfig"
    )
    assert type(AutoModel.from_config(cfg)) is HybridMambaModel
    assert type(AutoModelForCausalLM.from_config(cfg)) is HybridMambaForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(cfg)) is HybridMambaForSequenceClassification


def test_sequence_classification_uses_last_real_token():
    cfg = tiny_config("hybrid", num_labels=3, pad_token_id=0)
    m = HybridMambaForSequenceClassification(cfg).eval()
    x = ids(2, 10)
    x[1, 7:] = 0  # right padding
    mask = (x != 0).long()
    out = m(x, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    with torch.no_grad():
        alone = m(x[1:, :7]).logits
    torch.testing.assert_close(out.logits[1:].detach(), alone, atol=1e-5, rtol=1e-5)


def test_no_mlp_and_nope_layouts():
    for kw in (dict(intermediate_size=0), dict(position_embedding_type="none")):
        m = model_for("hybrid", **kw)
        x = ids(1, 11)
        with torch.no_grad():
            full = m(x).logits
            c = m(x[:, :10], use_cache=True)
            step = m(x[:, 10:], past_key_values=c.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    assert model_for("hybrid", intermediate_size=0).model.layers[0].mlp is None
    assert model_for("hybrid", position_embedding_type="none").model.rotary_emb is None


def test_long_inputs_in_blocks_equal_one_pass(monkeypatch):
    """A Mamba-2 mixer splits long inputs into blocks on CPU (CPU_BLOCK_TOKENS): same logits, same
    gradients, same cache (decode after a blocked prefill), also when the last block is one token."""
    import hybrid_mamba.modeling.modeling_hybrid_mamba as mm

    m, x = model_for("hybrid"), ids(t=22)
    with torch.no_grad():
        whole = m(x, use_cache=False).logits
    m.zero_grad()
    m(x, labels=x, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    monkeypatch.setattr(mm, "CPU_BLOCK_TOKENS", 7)  # 22 = 7 + 7 + 7 + 1
    with torch.no_grad():
        torch.testing.assert_close(m(x, use_cache=False).logits, whole, atol=1e-5, rtol=1e-5)
        out = m(x[:, :15], use_cache=True)
        nxt = m(x[:, 15:16], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(nxt.logits[:, -1], whole[:, 15], atol=1e-5, rtol=1e-5)
        rest = m(x[:, 16:], past_key_values=nxt.past_key_values, use_cache=True)  # 6 tokens: one block
        torch.testing.assert_close(rest.logits, whole[:, 16:], atol=1e-5, rtol=1e-5)
    m.zero_grad()
    m(x, labels=x, use_cache=False).loss.backward()
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_attention_cache_appends_in_place_and_honours_crop():
    """Attention layers' cache grows by writing into spare room (no copy of the whole cache per token);
    cropping and continuing gives what a cache of the cropped prefix gives."""
    m, x = model_for("hybrid"), ids(t=40)
    attn = [i for i, t in enumerate(m.config.layer_types) if t == "attention"][0]
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        out = m(x[:, :2], use_cache=True)
        cache, buffers = out.past_key_values, set()
        for i in range(2, 40):
            out = m(x[:, i : i + 1], past_key_values=cache, use_cache=True)
            buffers.add(cache.layers[attn]._key_buffer.data_ptr())
            torch.testing.assert_close(out.logits[:, -1], full[:, i], atol=1e-5, rtol=1e-5)
        assert len(buffers) == 1  # 38 appends, no reallocation
        assert cache.layers[attn].keys.shape[-2] == 40
        # crop the attention layers' last 5 tokens; Mamba layers cannot be cropped, so compare only
        # the attention cache contents against a fresh prefill of the first 35 tokens
        layer = cache.layers[attn]
        layer.crop(-5)
        fresh = m(x[:, :35], use_cache=True).past_key_values.layers[attn]
        torch.testing.assert_close(layer.keys, fresh.keys)
        k, v = layer.update(torch.ones_like(layer.keys[..., :1, :]), torch.ones_like(layer.values[..., :1, :]))
        assert k.shape[-2] == 36 and bool((k[..., 35, :] == 1).all())
        torch.testing.assert_close(k[..., :35, :], fresh.keys)
