"""eval_harness/bench_codesign.py: the bases are what the arms claim (CSP: same function, permuted; SDM: a
smaller config; full: both), and the report and verdicts follow the numbers they are given."""

import json
import math
from pathlib import Path

import pytest
import torch

from hybrid_mamba.eval_harness import bench_codesign as bc
from hybrid_mamba.modeling import HybridMambaForCausalLM

SEQ = 32
REPO = Path(bc.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the default --finetune_config is relative to the repository root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A demo base (debug preset), a tiny DATA/ with its tokenizer, and CSP, SDM and CSP(SDM) of it."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hybrid_mamba.trainers.demo_base import demo_texts, make_demo_base

    root = tmp_path_factory.mktemp("codesign")
    base = make_demo_base(root / "base", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(base)
    ids = bc.text_rows(tok, demo_texts()[:400], SEQ, 24)
    data = root / "data"
    for name, part in (("train", ids[:20]), ("validation", ids[20:])):
        Dataset.from_dict({"input_ids": part.tolist(), "position_ids": [list(range(SEQ))] * len(part)}).save_to_disk(
            str(data / name)
        )
    tok.save_pretrained(data / "tokenizer")
    calibration = ids[:4]
    reports = {"csp": bc.build_csp(base, root / "csp", calibration)}
    reports["sdm"] = bc.build_sdm(base, root / "sdm", data, root / "prune_run", 0.3, steps=4, micro_batch=2)
    reports["full"] = bc.build_csp(root / "sdm", root / "full", calibration)
    return {"root": root, "base": base, "data": data, "ids": ids[20:22], "reports": reports}


def _lm(folder):
    return HybridMambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def _logits(folder, ids):
    return _lm(folder)(input_ids=ids, use_cache=False).logits


def _permuted(a, b) -> bool:
    """Some weight differs between two models of the same shapes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_csp_base_is_the_base_permuted(built):
    root, ids = built["root"], built["ids"]
    assert built["reports"]["csp"]["reordered"] > 0
    torch.testing.assert_close(_logits(root / "csp", ids), _logits(built["base"], ids), atol=1e-5, rtol=0)
    assert _permuted(_lm(root / "csp"), _lm(built["base"]))
    assert json.loads((root / "csp" / "config.json").read_text())["hidden_size"] == 64
    # the classifier built from it (what fine-tuning loads) gives the base's outputs too
    a, b = bc.load_classifier(root / "csp"), bc.load_classifier(built["base"])
    with torch.no_grad():
        torch.testing.assert_close(a.model(input_ids=ids)[0], b.model(input_ids=ids)[0], atol=1e-5, rtol=0)


def test_sdm_base_is_smaller(built):
    root = built["root"]
    base, sdm = bc.load_classifier(built["base"]), bc.load_classifier(root / "sdm")
    s_base, s_sdm = bc.size_row(base, 16), bc.size_row(sdm, 16)
    assert s_sdm["non_embedding_parameters"] < 0.8 * s_base["non_embedding_parameters"]
    assert s_sdm["flops_per_token"] < s_base["flops_per_token"]
    cfg = json.loads((root / "sdm" / "config.json").read_text())
    widths = (cfg["mamba_d_inner_per_layer"] or []) + (cfg["intermediate_size_per_layer"] or [])
    assert widths and min(widths) < 128  # some layer lost heads or MLP channels
    assert 0.25 < built["reports"]["sdm"]["sparsity"] < 0.35


def test_full_base_is_sdm_permuted(built):
    root, ids = built["root"], built["ids"]
    sdm_cfg = json.loads((root / "sdm" / "config.json").read_text())
    full_cfg = json.loads((root / "full" / "config.json").read_text())
    for key in ("mamba_d_inner_per_layer", "intermediate_size_per_layer"):
        assert full_cfg[key] == sdm_cfg[key]
    assert built["reports"]["full"]["reordered"] > 0
    assert _permuted(_lm(root / "full"), _lm(root / "sdm"))
    torch.testing.assert_close(_logits(root / "full", ids), _logits(root / "sdm", ids), atol=1e-5, rtol=0)


def test_data_with_another_tokenizer_is_refused(built, tmp_path):
    from hybrid_mamba.trainers.demo_base import build_tokenizer

    other = tmp_path / "data"
    build_tokenizer(280).save_pretrained(other / "tokenizer")
    args = bc.BenchCodesignArgs(data=str(other), work=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="another tokenizer"):
        bc.ensure_data(args, built["base"])
    assert bc.ensure_data(bc.BenchCodesignArgs(data=str(built["data"])), built["base"]) == built["data"]


def test_arms():
    arms = bc.BenchCodesignArgs().arms()
    assert arms["M_base"] == ("base", "uniform") and arms["M_CSP"] == ("csp", "uniform")
    assert arms["M_SDM"] == ("sdm", "uniform") and arms["M_SGH"] == ("base", "importance")
    assert arms["M_full"] == ("full", "importance") and arms["M_dense_trained"] == ("dense_trained", "uniform")
    assert "M_dense_trained" not in bc.BenchCodesignArgs(dense_control=False).arms()
    with pytest.raises(ValueError, match="sparsity"):
        bc.BenchCodesignArgs(sparsity=1.5)


# report and verdicts from made-up numbers


def _latency(ratios: dict) -> dict:
    """ratios: name -> per-repetition ratios to base."""
    reps = len(next(iter(ratios.values())))
    out = {"base": {"times_s": [0.01] * reps, "median_s": 0.01}}
    for n, rs in ratios.items():
        out[n] = {"times_s": [0.01 * r for r in rs], "median_s": 0.01 * sorted(rs)[len(rs) // 2]}
    out["ratio_to_base"] = {n: bc.ratio_summary(rs) for n, rs in ratios.items()}
    return out


def _synthetic(csp_ratios) -> dict:
    seeds = [0, 1, 2, 3, 4]
    noise = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    per_batch = _latency(
        {
            "copy": noise,
            "csp": csp_ratios,
            "sdm": [0.8, 0.82, 0.78, 0.81, 0.79, 0.8],
            "full": [0.8, 0.81, 0.79, 0.8, 0.8, 0.8],
        }
    )
    acc = {  # importance ranks always 0.05 above uniform; SDM always 0.1 below
        "M_base": [0.70, 0.75, 0.80, 0.65, 0.72],
        "M_CSP": [0.71, 0.74, 0.80, 0.66, 0.71],
        "M_SDM": [0.60, 0.65, 0.70, 0.55, 0.62],
        "M_SGH": [0.75, 0.80, 0.85, 0.70, 0.77],
        "M_full": [0.65, 0.70, 0.75, 0.60, 0.67],
        "M_dense_trained": [0.60, 0.65, 0.70, 0.55, 0.62],
    }
    runs = {
        arm: {
            str(s): {
                "final_eval": {m: v for m in bc.METRICS},
                "trainable_parameters": 17760 if "SDM" not in arm and "full" not in arm else 12000,
            }
            for s, v in zip(seeds, vals)
        }
        for arm, vals in acc.items()
    }
    size = {
        n: {"parameters": p, "non_embedding_parameters": p - 100, "parameter_bytes": 4 * p, "flops_per_token": 2.0 * p}
        for n, p in (("base", 1000), ("csp", 1000), ("sdm", 700), ("full", 700))
    }
    mem = {
        n: {
            "parameter_bytes": 4000,
            "load_rss_growth_bytes": [2**20],
            "forward_peak_rss_growth_bytes": [2**21],
            "method": "VmHWM",
        }
        for n in size
    }
    results = {
        "machine": {"cpu": "cpu", "cores_available": 2, "torch": "t", "transformers": "x", "date": "d"},
        "args": bc.asdict(bc.BenchCodesignArgs()),
        "seeds": seeds,
        "loadavg_1min": {"start": 1.0, "before_finetune": 1.5, "end": 2.0},
        "wall_time_s": 600.0,
        "arm_definitions": bc.BenchCodesignArgs().arms(),
        "build": {"data": "DATA"},
        "size": size,
        "latency": {"1": per_batch, "16": per_batch},
        "memory": mem,
        "runs": runs,
        **bc.aggregate(runs, seeds),
    }
    results["verdicts"] = bc.verdicts(results)
    return results


def test_verdicts_say_no_effect_for_noise_and_read_the_differences():
    r = _synthetic([1.01, 0.99, 1.02, 1.0, 0.98, 1.01])
    v = r["verdicts"]
    assert "no effect" in v["H1_csp_latency"] and "outside every interval" in v["H1_csp_latency"]
    assert (
        "FLOPs/token cut 30.0%" in v["H2_sdm_flops_accuracy"]
        and "inside the claimed 25-34%" in v["H2_sdm_flops_accuracy"]
    )
    assert "(lower)" in v["H2_sdm_flops_accuracy"]  # SDM 0.1 below on every seed
    assert "M_SDM - M_dense_trained" in v["H2_sdm_flops_accuracy"]
    assert "+0.050" in v["H3_sgh_vs_uniform"] and "(higher)" in v["H3_sgh_vs_uniform"]
    assert "20% faster" in v["H4_full_combined"] and "(lower)" in v["H4_full_combined"]
    assert "0.0625" in v["note"]
    d = r["difference_vs_M_base"]["M_SGH"]["val_accuracy"]
    assert (d["above"], d["below"], d["zero"]) == (5, 0, 0) and d["wilcoxon_p"] == pytest.approx(0.0625)
    md = bc.to_markdown(r)
    assert "| M_SGH | base | importance |" in md and "| M_full | full | importance |" in md
    assert "| M_SGH | val_accuracy | 0.0500 ± 0.0000" in md
    assert md.count("- **H") == 4


def test_verdict_reports_a_real_latency_cut():
    v = bc.verdicts(_synthetic([0.75, 0.76, 0.74, 0.77, 0.75, 0.76]))["H1_csp_latency"]
    assert "25% faster" in v and "inside the interval at batch 1, 16" in v


def test_latency_effect_needs_the_copy_control_too():
    r = bc.ratio_summary([0.9, 0.91, 0.89, 0.9])
    assert r["geomean"] == pytest.approx(math.exp(sum(math.log(x) for x in (0.9, 0.91, 0.89, 0.9)) / 4))
    assert bc.ratio_effect(r) == "10% faster"
    assert bc.ratio_effect(bc.ratio_summary([1.1, 1.12, 1.09, 1.1])) == "10% slower"
    assert bc.ratio_effect(bc.ratio_summary([1.1, 0.9, 1.0, 1.05])) == "no effect"
    # 10% below the base, but the copy of the base is as far below it: no effect
    lat = _latency({"copy": [0.9, 0.92, 0.88, 0.9], "csp": [0.9, 0.91, 0.89, 0.9]})
    assert bc.latency_verdict(lat, "csp").endswith("no effect beyond the copy control")
    lat = _latency({"copy": [1.0, 1.02, 0.98, 1.0], "csp": [0.9, 0.91, 0.89, 0.9]})
    assert bc.latency_verdict(lat, "csp").endswith("10% faster")


def test_render_rewrites_the_report_from_the_json(tmp_path):
    r = _synthetic([1.01, 0.99, 1.02, 1.0, 0.98, 1.01])
    r["verdicts"] = {"stale": "x"}
    (tmp_path / "bench_codesign.json").write_text(json.dumps(r))
    bc.main(["--render", "--out", str(tmp_path)])
    md = (tmp_path / "bench_codesign.md").read_text()
    assert "stale" not in md and "**H1_csp_latency**" in md
    assert "H4_full_combined" in json.loads((tmp_path / "bench_codesign.json").read_text())["verdicts"]
