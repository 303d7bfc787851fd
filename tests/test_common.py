"""The shared helpers of common/ (and trainers/collate.py): atomic writes that fail without harm,
the folder swap, the statistics' missing-value convention, the credential shapes both the data
pipeline and the publisher use, lm-eval result parsing, the machine record, right padding."""

import json
import math
import os

import pytest
import torch

from hybrid_mamba.common import credentials, files, lm_eval_results, stats
from hybrid_mamba.common.machine import machine
from hybrid_mamba.data_scripts.pii import scrub
from hybrid_mamba.data_scripts.recipe import PIIConfig
from hybrid_mamba.hub_cards.secrets import find_credential
from hybrid_mamba.trainers.collate import right_pad


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# Atomic file writes


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    files.write_text_atomic(path, "first\n")
    files.write_text_atomic(path, "second, é\n")
    assert path.read_text(encoding="utf-8") == "second, é\n"
    assert _siblings(path) == []
    # the permissions of a plain open(): 0666 minus the umask
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old content\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)  # the new text is written, its flush to disk fails
    with pytest.raises(OSError, match="No space left"):
        files.write_text_atomic(path, "new content that never lands\n")
    monkeypatch.undo()
    assert path.read_text() == "old content\n" and _siblings(path) == []

    with pytest.raises(RuntimeError, match="writer died"):
        with files.atomic_file(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert path.read_text() == "old content\n" and _siblings(path) == []

    # JSON is serialised before anything is written: a value strict JSON lacks changes nothing
    with pytest.raises(ValueError):
        files.write_json_atomic(path, {"x": math.nan}, allow_nan=False)
    assert path.read_text() == "old content\n" and _siblings(path) == []


def test_write_json_atomic_round_trips(tmp_path):
    files.write_json_atomic(tmp_path / "r.json", {"a": [1, 2.5, None]}, allow_nan=False)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [1, 2.5, None]} and text.endswith("}\n")


# Atomic folders


def test_atomic_dir_swaps_in_the_new_folder_and_keeps_the_old_until_then(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with files.atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "deep.txt").write_text("deep")
        assert (target / "old.txt").read_text() == "old"  # untouched while the new one is built
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["new.txt", "sub", "sub/deep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.tmp-* or .out.old-* left


def test_atomic_dir_that_fails_leaves_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyError):
        with files.atomic_dir(target) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise KeyError("build failed")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_restores_an_interrupted_swap_and_removes_dead_leftovers(tmp_path):
    dead = 999_999_999  # no such process
    (tmp_path / f".out.old-{dead}").mkdir()  # killed between moving the old folder away and the new in
    (tmp_path / f".out.old-{dead}" / "kept.txt").write_text("kept")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    with files.atomic_dir(tmp_path / "out") as tmp:
        # the old folder is back in place before the new one is built
        assert (tmp_path / "out" / "kept.txt").read_text() == "kept"
        assert not (tmp_path / f".out.tmp-{dead}").exists()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# Statistics: one convention for values and statistics that are not there


def test_summarize_leaves_out_missing_values_and_says_none_for_undefined_statistics():
    s = stats.summarize([1.0, math.nan, 2.0, None, 4.0, math.inf])
    full = stats.summarize([1.0, 2.0, 4.0])
    assert (s["n"], s["missing"]) == (3, 3) and s["values"] == [1.0, None, 2.0, None, 4.0, None]
    for key in ("mean", "std", "stderr"):
        assert s[key] == pytest.approx(full[key])
    assert s["ci95"] == pytest.approx(full["ci95"])
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN anywhere

    one = stats.summarize([0.5, math.nan])
    assert (one["n"], one["mean"], one["std"], one["stderr"], one["ci95"]) == (1, 0.5, None, None, None)
    none = stats.summarize([math.nan])
    assert none["n"] == 0 and none["mean"] is None and none["values"] == [None]
    with pytest.raises(ValueError, match="at least one value"):
        stats.summarize([])


def test_paired_and_format_summary():
    zero = stats.paired([0.0, 0.0, 0.0])
    assert zero["wilcoxon_p"] is None and (zero["above"], zero["below"], zero["zero"]) == (0, 0, 3)
    p = stats.paired([0.1, math.nan, -0.2, 0.3])
    assert (p["above"], p["below"], p["zero"], p["missing"]) == (2, 1, 0, 1) and 0 < p["wilcoxon_p"] <= 1
    json.dumps(zero, allow_nan=False)
    assert (
        stats.format_summary(stats.summarize([1.0, 2.0, 3.0])) == "2.0000 ± 1.0000 [-0.4841, 4.4841]"
    )  # t(0.975, 2) / sqrt(3) = 2.4841
    assert stats.format_summary(stats.summarize([0.5])) == "0.5000 (n=1)"
    assert stats.format_summary(stats.summarize([None])) == "-"


# Credentials: one table of key shapes, used by the data pipeline and the publisher alike

KEY_SAMPLES = {  # split so that no key-shaped literal is committed
    "private key": "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEow\n-----END RSA " + "PRIVATE KEY-----",
    "AWS access key id": "AKIA" + "IOSFODNN7EXAMPLE",
    "AWS temporary access key id": "ASIA" + "IOSFODNN7EXAMPLE",
    "GitHub token": "ghp_" + "abcdefghijklmnopqrstuvwxyz0123456789",
    "GitHub fine-grained token": "github_pat_" + "A1b2" * 6,
    "API secret key": "sk-" + "proj-" + "a1B2" * 6,
    "Slack token": "xox" + "b-" + "1234567890-abcdef",
    "Google API key": "AIza" + "Sy" + "B" * 33,
    "Stripe secret key": "sk_" + "live_" + "a1B2" * 5,
    "Stripe restricted key": "rk_" + "test_" + "a1B2" * 5,
    "Hugging Face token": "hf_" + "a1B2c3D4" * 5,
    "JSON web token": "eyJ" + "hbGciOiJI" + ".eyJ" + "zdWIiOiIx" + "." + "SflKxwRJSMeKKF2QT4",
}


def test_every_key_shape_is_found_by_both_the_scrubber_and_the_publisher(tmp_path):
    assert set(KEY_SAMPLES) == set(credentials.KEY_PATTERNS)
    for kind, key in KEY_SAMPLES.items():
        text = f"config:\n  value = {key}\nend\n"
        assert credentials.find_key(text) == kind
        scrubbed, counts = scrub(text, PIIConfig(kinds=["key"]))
        assert scrubbed == "config:\n  value = <KEY>\nend\n" and counts["key"] == 1, kind
        path = tmp_path / "notes.txt"
        path.write_text(text)
        assert find_credential(path) == f"a {kind}-shaped string"


def test_key_shapes_inside_longer_words_are_not_keys(tmp_path):
    for text in ("xAKIA" + "IOSFODNN7EXAMPLE", "AKIA" + "IOSFODNN7EXAMPLEX", "my_hf_" + "a" * 34, "ask-" + "a1" * 12):
        assert credentials.find_key(text) is None, text
        assert credentials.replace_keys(text, "<KEY>") == (text, 0)
    # a truncated private key (no END line) is still refused and scrubbed
    head = "-----BEGIN " + "PRIVATE KEY-----\nMIIE"
    assert credentials.find_key(head) == "private key"
    assert credentials.replace_keys(head, "<KEY>") == ("<KEY>\nMIIE", 1)


# lm-eval results


def test_lm_eval_results_parse_metrics_and_later_files_win(tmp_path):
    res = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "ppl,none": 9,
                "ppl_stderr,none": "N/A",
                "exact_match,strict": 0.25,
                "exact_match_stderr,strict": 0.05,
                "flag,none": True,
                "sample_len": 10,
            },
            "group": {"alias": "group"},
        },
        "n-samples": {"t": {"original": 100, "effective": 20}},
    }
    assert lm_eval_results.metric_values(res) == {
        "t": {"acc": (0.5, 0.1), "ppl": (9.0, None), "exact_match (strict)": (0.25, 0.05)}
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results_2026-01-01.json").write_text(json.dumps(res))
    later = {"results": {"t": {"acc,none": 0.75}}}
    (tmp_path / "a" / "results_2026-01-02.json").write_text(json.dumps(later))
    (tmp_path / "a" / "other.json").write_text("[1, 2]")  # not lm-eval's: skipped in a folder
    assert lm_eval_results.read_results(tmp_path)["t"] == {"acc": (0.75, None)}
    assert lm_eval_results.read_documents(tmp_path) == {"t": (20, 100)}
    with pytest.raises(ValueError, match="not an lm-eval results file"):
        lm_eval_results.read_results(tmp_path / "a" / "other.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm_eval_results.read_results(tmp_path / "missing")


# Machine record


def test_machine_names_the_machine_and_the_libraries():
    m = machine(threads=3, libraries=("torch", "no-such-distribution"))
    assert m["threads"] == 3 and m["torch"] == torch.__version__ and m["no-such-distribution"] is None
    assert m["cpu"] and m["python"] and m["cpu_count"] >= m["cores_available"] >= 1
    assert "threads" not in machine(libraries=())
    json.dumps(m, allow_nan=False)


# Right padding


def test_right_pad_pads_token_labels_and_stacks_row_labels():
    collate = right_pad(pad_token_id=7)
    chat = collate(
        [
            {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])},
            {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])},
        ]
    )
    assert chat["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert chat["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert chat["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    cls = collate(
        [
            {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor(1)},
            {"input_ids": torch.tensor([8, 9, 10, 11]), "labels": torch.tensor(0)},
        ]
    )
    assert cls["input_ids"].tolist() == [[5, 6, 7, 7], [8, 9, 10, 11]] and cls["labels"].tolist() == [1, 0]
    assert cls["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    regression = collate([{"input_ids": torch.tensor([1]), "labels": torch.tensor(0.5)}])
    assert regression["labels"].dtype == torch.float32 and regression["labels"].tolist() == [0.5]


# serving.serve_process: any OpenAI-compatible server command (transformers serve, vLLM)

HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_serve_process_waits_for_health_and_stops_the_server(tmp_path):
    import sys
    import urllib.request

    from hybrid_mamba.common.serving import free_port, serve_process

    port = free_port()
    cmd = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with serve_process(cmd, "test server", "127.0.0.1", port, tmp_path / "log", startup_timeout=60) as url:
        assert url == f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    with pytest.raises(OSError):  # stopped with the block: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_serve_process_that_exits_reports_its_last_lines(tmp_path):
    import sys

    from hybrid_mamba.common.serving import ServeError, free_port, serve_process

    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('starting'); print('no such model: x'); sys.exit(3)"]
    with pytest.raises(ServeError, match=r"test server exited with status 3 before answering: .*no such model: x"):
        with serve_process(cmd, "test server", "127.0.0.1", port, tmp_path / "log", startup_timeout=60):
            pass


def test_format_cell_is_the_results_table_format():
    assert stats.format_cell(stats.summarize([1.0, 2.0, 3.0])) == "2 ± 0.5774 [-0.4841, 4.484] (n=3)"
    assert stats.format_cell(stats.summarize([12345.0])) == "1.2345e+04 (n=1)"
    assert stats.format_cell(stats.summarize([None])) == "-" and stats.format_cell(None) == "-"
