"""Structured pruning: learned masks, exact removal, per-layer widths in the config, and the CLI's training."""

import json

import pytest
import torch
from conftest import tiny_config
from test_remote_code import load_in_fresh_process

from hybrid_mamba.configuration import HybridMambaConfig
from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.prune import (
    attach_masks,
    detach_masks,
    mask_groups,
    non_embedding_parameters,
    prune_model,
)


def sensitive_model(layout="hybrid", **overrides):
    """A random model whose output depends strongly on every unit (large init, no residual rescaling), so
    that a wrongly removed or kept unit shows in the logits far above rounding."""
    cfg = tiny_config(layout, initializer_range=0.1, rescale_prenorm_residual=False, **overrides)
    return HybridMambaForCausalLM(cfg).eval()


def random_gates(masks, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in masks.theta.values():
            t.copy_(torch.randn(t.shape, generator=g) * spread / masks.lr_scale)


@pytest.mark.parametrize(
    "layout, overrides",
    [("hybrid", {"mamba_n_groups": 2}), ("mamba2", {}), ("mamba1", {}), ("hybrid", {"mamba_ops": "reference"})],
    ids=["hybrid-2groups", "mamba2", "mamba1", "hybrid-reference-ops"],
)
def test_pruned_model_computes_what_the_masked_model_computes(layout, overrides):
    model = sensitive_model(layout, **overrides)
    ids = torch.randint(3, 512, (2, 37))
    with torch.no_grad():
        dense = model(ids).logits
    masks = attach_masks(model, 0.3)
    random_gates(masks)
    with torch.no_grad():
        masked = model(ids).logits
    small, plan, sparsity = prune_model(model)
    with torch.no_grad():
        pruned = small(ids).logits
    assert (masked - dense).abs().max() > 0.1  # the masks change the function: the comparison below means something
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)
    # the parameters removed are those the masks' bookkeeping counts
    assert non_embedding_parameters(small) == round(non_embedding_parameters(model) * (1 - sparsity))
    assert sparsity > 0.05
    detach_masks(model)
    assert not hasattr(model, "prune_masks")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense)  # hooks gone: the dense model again


def test_mamba2_heads_are_kept_in_equal_numbers_per_group_and_an_mlp_can_go():
    model = sensitive_model("hybrid", mamba_n_groups=2)
    masks = attach_masks(model, 0.3)
    with torch.no_grad():
        for name, t in masks.theta.items():
            if name.endswith("mamba2_heads"):  # group 0 strongly open, group 1 mostly closed
                la = torch.full_like(t, -6.0)
                la[: t.numel() // 2] = 6.0
                la[t.numel() // 2] = 0.5
                t.copy_(la / masks.lr_scale)
            elif name == "layer1_mlp_channels":
                t.fill_(-8.0 / masks.lr_scale)
    ids = torch.randint(3, 512, (1, 21))
    with torch.no_grad():
        masked = model(ids).logits
    small, plan, _ = prune_model(model)
    heads = small.config.mamba_d_inner_per_layer[0] // small.config.mamba_head_dim
    assert heads % 2 == 0 and heads >= 2  # at least one head in each group, the same number in both
    assert small.config.intermediate_size_per_layer[1] == 0 and small.model.layers[1].mlp is None
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked, atol=1e-5, rtol=0)


def test_pruned_folder_loads_and_decodes_as_the_full_forward(tmp_path):
    model = sensitive_model("hybrid", mamba_n_groups=2)
    random_gates(attach_masks(model, 0.3), seed=1)
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        masked = model(ids).logits
    small, _, _ = prune_model(model)
    small.save_pretrained(tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["intermediate_size_per_layer"] == small.config.intermediate_size_per_layer
    loaded = HybridMambaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked, atol=1e-5, rtol=0)
        out = loaded(ids[:, :16], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(16, 24):
            out = loaded(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
        torch.testing.assert_close(torch.cat(steps, 1), loaded(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pruned_folder_loads_as_remote_code(tmp_path):
    model = sensitive_model("hybrid", mamba_n_groups=2)
    random_gates(attach_masks(model, 0.3), seed=2)
    small, _, _ = prune_model(model)
    small.save_pretrained(tmp_path / "pruned")
    ids = torch.randint(3, 512, (1, 19))
    out = load_in_fresh_process(tmp_path / "pruned", ids, tmp_path)  # also checks cached == uncached generation
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], small(ids).logits, atol=1e-5, rtol=0)


def test_per_layer_widths_in_the_config():
    base = tiny_config("hybrid")  # mamba2, attention, mamba1, mamba2
    assert base.intermediate_size_per_layer is None and base.mamba_d_inner_per_layer is None
    cfg = tiny_config("hybrid", intermediate_size_per_layer=[32, 0, 64, 16], mamba_d_inner_per_layer=[48, 0, 40, 16])
    model = HybridMambaForCausalLM(cfg)
    layers = model.model.layers
    assert [layer.mlp.up_proj.out_features if layer.mlp else 0 for layer in layers] == [32, 0, 64, 16]
    assert layers[0].mamba.num_heads == 3 and layers[2].mamba.d_inner == 40 and layers[3].mamba.num_heads == 1
    assert layers[0].mamba.in_proj.out_features == 2 * 48 + 2 * cfg.mamba_d_state + 3
    with torch.no_grad():
        assert model(torch.randint(3, 512, (1, 9))).logits.shape == (1, 9, 512)
    reloaded = HybridMambaConfig.from_dict(cfg.to_dict())
    assert reloaded.mamba_d_inner_per_layer == [48, 0, 40, 16]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"intermediate_size_per_layer": [32, 32]}, "one non-negative integer per layer"),
        ({"intermediate_size_per_layer": [32, -1, 32, 32]}, "one non-negative integer per layer"),
        ({"mamba_d_inner_per_layer": [32, 16, 32, 32]}, "attention layer: give 0"),
        ({"mamba_d_inner_per_layer": [24, 0, 32, 32]}, "positive multiple of mamba_head_dim"),
        ({"mamba_d_inner_per_layer": [32, 0, 0, 32]}, "Mamba-1 layer needs at least one channel"),
        ({"mamba_d_inner_per_layer": [16, 0, 32, 32], "mamba_n_groups": 2}, "the same number of heads in every group"),
    ],
)
def test_bad_per_layer_widths_say_what_to_do(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config("hybrid", **overrides)


def test_gates_and_multipliers_move_the_right_way():
    model = sensitive_model("mamba2")
    masks = attach_masks(model, 0.4, lr_scale=1.0)
    assert masks.expected_sparsity() < 0.05  # gates start open (init_keep_prob 0.9)
    model.train()
    masks.penalty().backward()  # the target is 0.4 at once (no warm-up): sparsity is too low
    # the multiplier's gradient is reversed: descending on it raises the pressure toward sparsity
    assert masks.lambda_params.grad[0] > 0
    with torch.no_grad():
        masks.lambda_params.copy_(torch.tensor([-1.0, 0.0]))  # lambda_1 < 0: the penalty rewards sparsity
    model.zero_grad()
    masks.penalty().backward()
    assert all((t.grad > 0).all() for t in masks.theta.values())  # descending closes gates
    with pytest.raises(ValueError, match="choose a smaller one"):
        attach_masks(sensitive_model("mamba2"), 0.99)
    assert [g.kind for g in mask_groups(model)] == ["mamba2_heads", "mlp_channels"] * 2


def test_deterministic_masks_meet_the_target_dropping_the_lowest_gates_first():
    model = sensitive_model("mamba2")
    masks = attach_masks(model, 0.25)
    with torch.no_grad():
        for t in masks.theta.values():
            t.copy_(torch.linspace(-3, 3, t.numel())[torch.randperm(t.numel())] / masks.lr_scale)
        masks.theta["layer1_mlp_channels"].fill_(-9.0 / masks.lr_scale)  # the least useful units of all
    plan = masks.finalize()
    one_unit = max(g.groups * g.params_per_unit for g in masks.groups) / masks.total_params
    assert 0.25 <= masks.sparsity_of(plan) <= 0.25 + one_unit
    assert plan.keep["layer1_mlp_channels"].numel() == 0
    for g in masks.groups:  # what is kept has higher log-alpha than what is dropped, in every layer
        la = masks.log_alpha(g.name).detach()
        dropped = torch.ones(g.size, dtype=torch.bool)
        dropped[plan.keep[g.name]] = False
        if dropped.any() and (~dropped).any():
            assert la[~dropped].min() >= la[dropped].max()


def test_mask_training_with_the_loop_meets_the_target_and_writes_the_pruned_model(tiny_data, tmp_path):
    from hybrid_mamba.trainers import prune as prune_cli

    base = tmp_path / "base"
    HybridMambaForCausalLM(tiny_config("hybrid", vocab_size=300)).save_pretrained(base)
    out = tmp_path / "pruned"
    report = prune_cli.main(
        [
            "--model", str(base), "--data", str(tiny_data), "--sparsity", "0.4", "--out", str(out),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "30", "--micro_batch_size", "4",
            "--sparsity_warmup_steps", "10", "--mask_learning_rate", "0.3", "--lagrangian_learning_rate", "1.0",
            "--eval_every", "30", "--checkpoint_every", "100",
        ]
    )  # fmt: skip
    assert report["sparsity"] == pytest.approx(0.4, abs=0.01)
    # the gates learned: from about 2% expected sparsity at the start to near the target
    assert report["masks_at_end"]["expected_sparsity"] > 0.2 and report["masks_at_end"]["lambda_1"] < 0
    assert report["max_logit_diff_masked_vs_pruned"] < 1e-5
    # the loop's last evaluation ran the masked model with the deterministic masks: the pruned model's loss
    assert report["val_loss"]["pruned"] == pytest.approx(report["val_loss"]["masked"], abs=1e-4)
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["non_embedding_parameters"]["pruned"] < saved["non_embedding_parameters"]["dense"]
    small = HybridMambaForCausalLM.from_pretrained(out)
    assert non_embedding_parameters(small) == saved["non_embedding_parameters"]["pruned"]
    assert (out / "tokenizer.json").is_file()
