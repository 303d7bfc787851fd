"""CSP (modeling/csp.py): the correlation-based permutation keeps the function (logits, cached greedy
generation, a saved and reloaded folder), is not the identity on a random model, and a wrong
permutation is caught by the same checks. Also the latency benchmark's smoke test."""

import copy
import json

import pytest
import torch
from conftest import tiny_config

from hybrid_mamba.modeling import HybridMambaForCausalLM, csp

CASES = {
    "hybrid": ("hybrid", {}),
    "mamba2": ("mamba2", {}),
    "mamba2_groups2": ("mamba2", {"mamba_n_groups": 2}),
    "mamba1": ("mamba1", {}),
}
ATOL = 1e-5


def _pair(name):
    layout, overrides = CASES[name]
    model = HybridMambaForCausalLM(tiny_config(layout, **overrides)).eval()
    original = copy.deepcopy(model)
    ids = csp.calibration_ids(model.config.vocab_size, 128, 32, seed=1)
    report = {}
    perms = csp.csp_permute(model, ids, report=report)
    return original, model, perms, report


def _inputs(vocab, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row: the pad-mask paths of both mixers
    return ids, mask


@torch.no_grad()
def _max_diff(a, b, vocab):
    ids, mask = _inputs(vocab)
    return (a(input_ids=ids, attention_mask=mask).logits - b(input_ids=ids, attention_mask=mask).logits).abs().max()


def _moved(perm):
    return bool((perm != torch.arange(perm.shape[-1])).any())


@pytest.mark.parametrize("name", list(CASES))
def test_permutation_keeps_the_logits_and_is_not_the_identity(name):
    original, permuted, perms, report = _pair(name)
    assert _max_diff(original, permuted, original.config.vocab_size) < ATOL
    kinds = {key.rsplit(":", 1)[1] for key in perms}
    expected = {"mlp"} | {
        k for t in set(original.config.layer_types) for k in csp.KINDS if k.startswith(t) and t != "attention"
    }
    assert kinds == expected
    for kind in kinds:  # every kind of set is reordered somewhere, so the logits check can fail
        assert any(_moved(p) for k, p in perms.items() if k.endswith(":" + kind)), kind
    for k, s in report.items():  # seriation keeps the identity unless its order has more correlated neighbours
        assert s["adjacent_abs_corr_after"] >= s["adjacent_abs_corr_before"] - 1e-9, k
    # the weights did change
    diffs = [not torch.equal(p, q) for p, q in zip(original.parameters(), permuted.parameters())]
    assert any(diffs)


def test_heads_stay_within_their_group():
    _, model, perms, _ = _pair("mamba2_groups2")
    mixer = model.model.layers[0].mamba
    hg = mixer.num_heads // mixer.n_groups
    for key, p in perms.items():
        if key.endswith(":mamba2_heads"):
            assert torch.equal(p // hg, torch.arange(mixer.num_heads) // hg)
    with pytest.raises(ValueError, match="out of its group"):
        csp.permute_mamba2_heads(mixer, torch.arange(mixer.num_heads).flip(0))
    with pytest.raises(ValueError, match="permutation"):
        csp.permute_mamba1_state(HybridMambaForCausalLM(tiny_config("mamba1")).model.layers[0].mamba, [0, 0])


@pytest.mark.parametrize("name", ["hybrid", "mamba2_groups2", "mamba1"])
def test_cached_greedy_generation_is_unchanged(name):
    original, permuted, _, _ = _pair(name)
    ids = torch.randint(0, original.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a, b = original.generate(ids, **kw), permuted.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max() for x, y in zip(a.scores, b.scores)) < ATOL


def test_apply_on_a_copy_matches_and_leaves_the_model_alone():
    original, permuted, perms, _ = _pair("hybrid")
    before = copy.deepcopy(original.state_dict())
    copied = csp.apply_permutations(original, perms, inplace=False)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, permuted.state_dict()[k]) for k, v in copied.state_dict().items())


@pytest.mark.parametrize(
    "wrong",
    ["A_log only", "B without C", "head across groups", "channels without out_proj"],
)
def test_a_wrong_permutation_changes_the_outputs(wrong):
    """What the checks above would catch: each is one piece left out of a function-preserving permutation."""
    name = "mamba1" if wrong == "channels without out_proj" else "mamba2_groups2"
    original, _, perms, _ = _pair(name)
    model = copy.deepcopy(original)
    mixer = model.model.layers[0].mamba
    with torch.no_grad():
        if wrong == "A_log only":
            mixer.A_log.copy_(mixer.A_log[perms["model.layers.0.mamba:mamba2_heads"]])
        elif wrong == "B without C":
            e, n = mixer.d_inner, mixer.d_state
            rows = torch.arange(mixer.in_proj.out_features)
            rows[2 * e : 2 * e + n] = 2 * e + perms["model.layers.0.mamba:mamba2_state"][0]  # B of group 0 only
            conv = rows[e : e + mixer.conv_dim] - e
            mixer.in_proj.weight.copy_(mixer.in_proj.weight[rows])
            mixer.conv1d.weight.copy_(mixer.conv1d.weight[conv])
            mixer.conv1d.bias.copy_(mixer.conv1d.bias[conv])
        elif wrong == "head across groups":  # everything of a head, moved to the other group
            hg = mixer.num_heads // mixer.n_groups
            perm = torch.arange(mixer.num_heads)
            perm[[0, hg]] = perm[[hg, 0]]
            mixer.n_groups = 1  # fool the group check: the norm and the scan still use 2 groups
            csp.permute_mamba2_heads(mixer, perm)
            mixer.n_groups = 2
        else:
            p = perms["model.layers.0.mamba:mamba1_channels"]
            saved = mixer.out_proj.weight.clone()
            csp.permute_mamba1_channels(mixer, p)
            mixer.out_proj.weight.copy_(saved)
    assert _max_diff(original, model, original.config.vocab_size) > 1e-3


def test_seriation_puts_correlated_units_next_to_each_other():
    # two blocks of units, interleaved: 0, 2, 4 correlate with each other, 1, 3, 5 too
    corr = torch.eye(6)
    for a in (0, 2, 4):
        for b in (0, 2, 4):
            corr[a, b] = 1.0 if a == b else 0.9
            corr[a + 1, b + 1] = 1.0 if a == b else -0.8  # sign does not matter
    order = csp.seriate(corr).tolist()
    assert sorted(order) == list(range(6))
    first, second = {order[i] % 2 for i in range(3)}, {order[i] % 2 for i in range(3, 6)}
    assert len(first) == 1 and len(second) == 1 and first != second
    assert csp.adjacent_correlation(corr, order) > csp.adjacent_correlation(corr)


def test_cli_writes_a_folder_that_reloads_with_the_same_function(tmp_path):
    model = HybridMambaForCausalLM(tiny_config("hybrid")).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    argv = ["--model", str(src), "--out", str(out), "--calibration_tokens", "64", "--seq_len", "32", "--seed", "3"]
    assert csp.main(argv) is None
    record = json.loads((out / "csp.json").read_text())
    assert record["calibration"] == {"tokens": 64, "seq_len": 32, "seed": 3}
    reloaded = HybridMambaForCausalLM.from_pretrained(out).eval()
    assert _max_diff(model, reloaded, model.config.vocab_size) < ATOL
    assert not torch.equal(reloaded.model.layers[0].mamba.A_log, model.model.layers[0].mamba.A_log)
    # the permutations in csp.json, applied to the source, give the saved weights
    perms = {k: torch.tensor(v) for k, v in record["permutations"].items()}
    again = csp.apply_permutations(model, perms, inplace=False)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in again.state_dict().items())


def test_cli_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        csp.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_permuted_model_runs_the_same_ops_on_the_same_layouts():
    """The reason CSP cannot change dense CPU latency: the same aten ops, shapes, strides and dtypes."""
    from hybrid_mamba.eval_harness import bench_csp

    original, permuted, _, _ = _pair("hybrid")
    trace = bench_csp.op_trace(original, seed=0, prompt=16)
    assert trace == bench_csp.op_trace(permuted, seed=0, prompt=16)
    assert any("mm" in op or "linear" in op for op, _ in trace)


def test_bench_csp_smoke(tmp_path):
    from hybrid_mamba.eval_harness import bench_csp

    results = bench_csp.main(
        [
            "--model",
            "debug",
            "--prompts",
            "16",
            "--decode_steps",
            "2",
            "--reps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--calibration_tokens",
            "64",
            "--out",
            str(tmp_path / "bench"),
        ]
    )
    assert results is None
    saved = json.loads((tmp_path / "bench" / "bench_csp.json").read_text())
    assert saved["max_abs_logit_diff"] < ATOL
    assert saved["op_trace"]["identical"] and saved["op_trace"]["ops"] > 100
    assert set(saved["prefill"]["16"]) == {"original", "csp", "copy", "ratio"}
    assert set(saved["decode"]["16"]["ratio"]) == {"csp", "copy"}
    assert (tmp_path / "bench" / "bench_csp.md").read_text().startswith("# CSP")
