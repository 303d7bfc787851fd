"""The datatrove pipeline: the same stage functions as the in-memory mode, the same kept documents on the
demo corpus, output independent of the task count, and resuming from datatrove's completion markers."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hybrid_mamba.data_scripts import pipeline
from hybrid_mamba.data_scripts.recipe import RecipeError, expand_placeholders, load_recipe

pytest.importorskip("datatrove")  # the `datatrove` extra
from hybrid_mamba.data_scripts import datatrove_pipeline as dtp

DEMO = Path(__file__).resolve().parents[1] / "data_scripts" / "recipes" / "demo.yaml"
SLURM = DEMO.parent / "production_slurm.yaml"
RAY = DEMO.parent / "production_ray.yaml"


def _hashes(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(recipe_path: Path, out: Path, tasks: int, workers: int = 1) -> Path:
    recipe, cfg = dtp.load_run_config(recipe_path)
    cfg.tasks, cfg.workers = tasks, workers
    dtp.run_build(recipe, cfg, out, keep_work=True)
    return out.with_name(out.name + ".datatrove") / "data"


def _shards(folder: Path) -> list:
    return [d for rank in dtp._shard_ranks(folder) for d in dtp.read_shard(folder, rank)]


def _kept(work: Path) -> list[tuple]:
    return [(d.metadata["source"], d.id, d.text) for d in _shards(work / "deduped")]


def _removed(work: Path) -> set[tuple]:
    return {(d.metadata["source"], d.id, d.metadata["reason"]) for d in _shards(work / "removed" / "curate")} | {
        (d.metadata["source"], d.id, d.metadata["reason"])
        for k in ("filter", "dedup")
        for d in _shards(work / "removed" / k)
    }


def _in_memory(recipe_path: Path, tmp: Path) -> tuple[list[tuple], set[tuple]]:
    """Kept (source, id, text) in reading order and removed (source, id, reason) of the in-memory stages."""
    from hybrid_mamba.data_scripts.cache import fingerprint
    from hybrid_mamba.data_scripts.prepare import check_inputs

    recipe = load_recipe(recipe_path)
    files = check_inputs(recipe)
    b = pipeline.Build(recipe, files, out=tmp, fingerprint=fingerprint(recipe, files)["fingerprint"], num_proc=1)
    ds, perm, _, _ = pipeline.curate_in_memory(b)
    rows = ds.select_columns(["source", "id", "text", "reason"]).select(np.argsort(perm))
    kept, removed = [], set()
    for r in rows:
        if r["reason"]:
            removed.add((r["source"], r["id"], r["reason"]))
        else:
            kept.append((r["source"], r["id"], r["text"]))
    return kept, removed


def test_steps_run_the_in_memory_stage_functions():
    rows = {s.name: s for s in pipeline.STAGES}
    for name in dtp.CURATE_STAGES + dtp.FILTER_STAGES:
        step = dtp.DocStage(name)
        assert step.fn is rows[name].fn and step.batch_size == rows[name].batch_size
    recipe = load_recipe(DEMO)
    mh = dtp.minhash_config(recipe.dedup, recipe.seed)
    assert (mh.num_buckets, mh.hashes_per_bucket, mh.n_grams) == (9, 13, 5)  # datasketch's banding for 0.8, 128
    assert mh.num_buckets * mh.hashes_per_bucket <= recipe.dedup.num_perm
    words = dtp.DedupWords().word_tokenize("def foo_bar(x): return x.y  # 42")
    assert words == ["def", "foo_bar", "x", "return", "x", "y", "42"]


def test_percentile_merge_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        scores = np.round(rng.normal(size=n), 2)  # ties included
        runs = [np.sort(part) for part in np.array_split(rng.permutation(scores), 3)]
        for p in (0.5, 5, 10, 33.3, 50, 99):
            expected = np.percentile(scores, p, method="lower")
            assert dtp.kth_smallest(runs, dtp.lower_percentile_index(n, p)) == expected


def test_recipe_executor_section_and_errors(tmp_path):
    recipe, cfg = dtp.load_run_config(SLURM)
    assert cfg.kind == "slurm" and recipe.name == "production" and "partition" in cfg.options
    assert recipe.to_dict() == load_recipe(DEMO.parent / "production.yaml").to_dict()
    _, ray_cfg = dtp.load_run_config(RAY)
    assert ray_cfg.kind == "ray"
    inline = yaml.safe_load(DEMO.read_text()) | {"executor": {"tasks": 3, "options": {"start_method": "fork"}}}
    (tmp_path / "inline.yaml").write_text(yaml.safe_dump(inline))
    recipe, cfg = dtp.load_run_config(tmp_path / "inline.yaml")
    assert recipe.to_dict() == load_recipe(DEMO).to_dict() and (cfg.kind, cfg.tasks) == ("local", 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"recipe": str(DEMO), "executor": {"options": {"tasks": 3}}}))
    with pytest.raises(RecipeError, match="'tasks' is set by the build"):
        dtp.load_run_config(bad)
    bad.write_text(yaml.safe_dump({"recipe": str(DEMO), "executor": {"kind": "local", "stages": {"nope": {}}}}))
    with pytest.raises(RecipeError, match="unknown stage 'nope'"):
        dtp.load_run_config(bad)
    bad.write_text(yaml.safe_dump({"recipe": str(DEMO), "executor": {"kind": "mpi"}}))
    with pytest.raises(RecipeError, match="'mpi' is not one of"):
        dtp.load_run_config(bad)


def test_executor_options_map_to_datatrove_executors(tmp_path):
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.executor.ray import RayPipelineExecutor

    from hybrid_mamba.data_scripts.prepare import check_inputs

    recipe = load_recipe(DEMO)
    files = check_inputs(recipe)
    fp = dtp.fingerprint_for(recipe, files)
    plan = dtp.build_plan(recipe, files, fp, tmp_path / "out", tmp_path / "work", tmp_path / "logs", tasks=8)
    assert plan.names() == list(dtp.STAGE_NAMES)
    assert [t for _, _, t in plan.stages] == [8, 1, 8, 9, 1, 8, 1, 8, 1]
    _, cfg = dtp.load_run_config(SLURM)
    slurm = dtp.make_executors(plan, cfg, job_name="demo")
    assert all(isinstance(e, SlurmPipelineExecutor) for e in slurm)
    assert [e.depends for e in slurm] == [None, *slurm[:-1]]
    cluster = slurm[plan.names().index("minhash_cluster")]
    assert (cluster.tasks, cluster.partition, cluster.time, cluster.mem_per_cpu_gb) == (1, "cpu", "24:00:00", 16)
    curate = slurm[0]
    assert (curate.tasks, curate.cpus_per_task, curate.job_name) == (8, 2, "demo_curate")
    assert str(curate.logging_dir.path).endswith("logs/01_curate")
    # Slurm jobs and Ray tasks get the executor pickled with dill, its whole depends chain included.
    import dill

    copy = dill.loads(dill.dumps(slurm[-1]))
    assert type(copy.pipeline[0]) is dtp.Pack and type(copy.depends.pipeline[0]) is dtp.TokenizeShard
    _, ray_cfg = dtp.load_run_config(RAY)
    ray = dtp.make_executors(plan, ray_cfg)
    assert all(isinstance(e, RayPipelineExecutor) for e in ray)
    assert (ray[0].workers, ray[0].cpus_per_task, ray[plan.names().index("tokenizer")].cpus_per_task) == (8, 2, 32)
    local = dtp.make_executors(plan, dtp.ExecutorConfig(tasks=8, workers=2))
    assert all(isinstance(e, LocalPipelineExecutor) for e in local) and local[0].workers == 2 and local[1].workers == 1
    with pytest.raises(dtp.DatatroveError, match="Slurm needs partition, time"):
        dtp.make_executors(plan, dtp.ExecutorConfig(kind="slurm"))


def _small_demo(root: Path) -> Path:
    """A slice of the demo corpus and its filters, plus a source of near and exact copies (dedup clusters
    that cross sources and tasks) and two documents found nowhere else."""
    demo = yaml.safe_load(DEMO.read_text())
    texts = Path(expand_placeholders(demo["sources"][0]["files"][0])).parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    plays = ["sonnets", "lovers_complaint", "passionate_pilgrim", "rape_of_lucrece", "macbeth", "tempest"]
    demo["sources"][0]["files"] = [str(texts / f"{p}_gut.txt") for p in plays]
    demo["sources"][1]["files"] = [str(stdlib / "[a-c]*.py")]
    rng = random.Random(0)

    def edited(text: str, every: int) -> str:
        lines = text.splitlines()
        for i in range(rng.randrange(every), len(lines), every):
            lines[i] = lines[i] + " # edited"
        return "\n".join(lines)

    copies = root / "copies"
    copies.mkdir(parents=True)
    tempest = (texts / "tempest_gut.txt").read_text(encoding="utf-8")
    base64 = (stdlib / "base64.py").read_text(encoding="utf-8")
    (copies / "a_tempest.txt").write_text(edited(tempest, 97), encoding="utf-8")
    (copies / "b_base64_1.txt").write_text(edited(base64, 53), encoding="utf-8")
    (copies / "c_base64_2.txt").write_text(edited(base64, 61), encoding="utf-8")
    (copies / "d_calendar.txt").write_text((stdlib / "calendar.py").read_text(encoding="utf-8").replace("\n", "  \n"))
    (copies / "e_unique.txt").write_text((stdlib / "difflib.py").read_text(encoding="utf-8"), encoding="utf-8")
    (copies / "f_unique.txt").write_text((stdlib / "dataclasses.py").read_text(encoding="utf-8"), encoding="utf-8")
    demo["sources"].append(
        {
            "name": "copies",
            "loader": "text",
            "files": [str(copies / "*.txt")],
            "weight": 0.1,
            "filters": {"min_chars": 200, "language": None, "quality": None, "pii": {}},
        }
    )
    demo["total_tokens"] = None
    demo["tokenizer"] = {"vocab_size": 1024}
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The slice of the demo in memory, and with datatrove on 1 task and on 4 tasks in 2 worker processes."""
    root = tmp_path_factory.mktemp("datatrove")
    recipe = _small_demo(root)
    mem_kept, mem_removed = _in_memory(recipe, root / "mem")
    one = _run(recipe, root / "t1" / "out", tasks=1)
    four = _run(recipe, root / "t4" / "out", tasks=4, workers=2)
    return {"recipe": recipe, "root": root, "mem": (mem_kept, mem_removed), "one": one, "four": four}


@pytest.mark.slow
def test_keeps_the_same_documents_as_in_memory(built):
    mem_kept, mem_removed = built["mem"]
    # Same documents, same text after normalisation and PII scrubbing, in the same reading order.
    assert _kept(built["four"]) == mem_kept
    # Same removals; datatrove's MinHash finds the exact copy as a near duplicate.
    expected = {(s, i, "dedup:near" if r == "dedup:exact" else r) for s, i, r in mem_removed}
    assert _removed(built["four"]) == expected
    reasons = {r for _, _, r in mem_removed}
    assert {"quality:percentile", "dedup:near", "dedup:exact"} <= reasons
    dedup = sorted(i for s, i, r in expected if r == "dedup:near")
    assert dedup == ["a_tempest.txt", "b_base64_1.txt", "c_base64_2.txt", "d_calendar.txt"]


@pytest.mark.slow
def test_same_documents_and_data_for_any_task_count(built):
    one, four = built["one"], built["four"]
    assert _kept(one) == _kept(four)
    assert _removed(one) == _removed(four)
    expected = _hashes(built["root"] / "t1" / "out")
    assert {"train/data-00000-of-00001.arrow", "report.json", "tokenizer/tokenizer.json"} <= set(expected)
    assert _hashes(built["root"] / "t4" / "out") == expected  # report.json holds no timings
    report = json.loads((built["root"] / "t1" / "out" / "report.json").read_text())
    assert report["mode"] == "datatrove"
    assert report["stages"]["dedup"]["copies"]["removed"]["near"]["docs"] == 4
    assert report["stages"]["dedup"]["python_stdlib"]["removed"] == {}
    assert report["splits"]["train"]["blocks"] > 0


@pytest.mark.slow
def test_resumes_after_a_failed_task(built, monkeypatch):
    recipe = built["recipe"]
    # A task of the tokenize stage fails: the stages before it and its other task are marked complete.
    real = dtp.TokenizeShard.run

    def fail_on_rank_1(self, data=None, rank=0, world_size=1):
        if rank == 1:
            raise RuntimeError("task killed")
        yield from real(self, data, rank, world_size)

    monkeypatch.setattr(dtp.TokenizeShard, "run", fail_on_rank_1)
    out = built["root"] / "t2" / "out"
    with pytest.raises(RuntimeError, match="task killed"):
        _run(recipe, out, tasks=2)
    assert not out.exists()
    logs = out.with_name("out.datatrove") / "logs"
    assert sorted(p.name for p in (logs / "08_tokenize" / "completions").iterdir()) == ["00000"]
    assert (logs / "01_curate" / "completions" / "00001").is_file()
    scored = out.with_name("out.datatrove") / "data" / "scored" / "00000.jsonl.gz"
    stamp = scored.stat().st_mtime_ns
    ran = []

    def record(self, data=None, rank=0, world_size=1):
        ran.append(rank)
        yield from real(self, data, rank, world_size)

    monkeypatch.setattr(dtp.TokenizeShard, "run", record)
    _run(recipe, out, tasks=2)
    assert ran == [1]  # only the failed task ran again
    assert scored.stat().st_mtime_ns == stamp  # finished stages were not rerun
    assert _hashes(out) == _hashes(built["root"] / "t1" / "out")


@pytest.mark.slow
def test_resumes_after_the_process_is_killed(built):
    """SIGKILL the command once a stage is part done; the next run ends with the same DATA."""
    out = built["root"] / "t3" / "out"
    logs = out.with_name("out.datatrove") / "logs"
    cmd = [sys.executable, "-m", "hybrid_mamba.data_scripts.datatrove_pipeline", "--recipe", str(built["recipe"])]
    cmd += ["--output", str(out), "--tasks", "3", "--workers", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (logs / "03_filter" / "completions" / "00000").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert not (logs / "08_tokenize" / "completions").exists()
    _run(built["recipe"], out, tasks=3)
    assert _hashes(out) == _hashes(built["root"] / "t1" / "out")


@pytest.mark.slow
def test_ray_executor_builds_the_same_data(built, monkeypatch):
    """The pipeline on a local Ray instance (loopback only, 2 CPUs) gives byte for byte the local build's DATA."""
    pytest.importorskip("ray")  # the `ray` extra of datatrove
    import ray
    from ray._private import ray_constants

    # Ray binds to the machine's address unless told it is not a cluster: keep every server on 127.0.0.1.
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")

    def too_slow(signum, frame):
        raise TimeoutError("the Ray build took more than 240 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(240)
    try:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            object_store_memory=100 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
        node = ray._private.worker._global_node
        pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
        assert node.node_ip_address == "127.0.0.1" and pids
        recipe, cfg = dtp.load_run_config(built["recipe"])
        cfg.kind, cfg.tasks, cfg.workers = "ray", 2, 2
        # One Ray task per datatrove task, two at once. (tasks_per_job > 1, the 9 MinHash bands in one Ray
        # task, hung here under load: every rank completed, the Ray task never returned.)
        cfg.options = {"cpus_per_task": 1, "mem_per_cpu_gb": 0.5, "time": 180}
        out = built["root"] / "ray" / "out"
        result = dtp.run_build(recipe, cfg, out, keep_work=True)
        assert ray.is_initialized()  # run_build leaves a Ray it did not start running
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        ray.shutdown()
    assert list(result["stages"]) == list(dtp.STAGE_NAMES)
    assert _hashes(out) == _hashes(built["root"] / "t1" / "out")
    assert _kept(out.with_name("out.datatrove") / "data") == _kept(built["one"])
    logs = out.with_name("out.datatrove") / "logs"
    assert sorted(p.name for p in (logs / "08_tokenize" / "completions").iterdir()) == ["00000", "00001"]
    assert len(list((logs / "04_minhash_buckets" / "completions").iterdir())) == 9
    # No Ray server (gcs_server, raylet) or worker outlives the shutdown.
    deadline = time.monotonic() + 10
    while (alive := _ray_processes(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"Ray processes still running after shutdown: {alive}"


def _ray_processes(pids: list[int]) -> list[str]:
    """The processes of ``pids`` and this process's descendants named like Ray's that are still running."""
    import psutil

    procs = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for pid in pids:
        try:
            procs.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    alive = []
    for pid, proc in procs.items():
        try:
            name = " ".join(proc.cmdline()[:2]) or proc.name()
            if proc.status() != psutil.STATUS_ZOMBIE and (pid in pids or "ray" in name):
                alive.append(f"{pid} {name[:80]}")
        except psutil.NoSuchProcess:
            pass
    return alive
