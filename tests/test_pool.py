"""Ray workers: shared sources, asynchronous dispatch, failures, dead workers, clusters."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.checkpoint import CheckpointReader
from evomerge.checkpoint.memory import MemoryCheckpoint, pack
from evomerge.config import SearchConfig
from evomerge.ledger import Ledger
from evomerge.merge import execute, plan_merge
from evomerge.recipe import MergeRecipe
from evomerge.search import load_space, search

EXAMPLE = Path(__file__).parent.parent / "examples" / "zoo-search.yaml"


def config(tmp_path, **overrides):
    base = {"output": str(tmp_path / "run"), "budget.max_evals": 12, "fitness.limit": 48, "workers.count": 2}
    base.update(overrides)
    return SearchConfig.load(EXAMPLE, base)


def read_only(packed):
    for _, _, raw in packed["tensors"].values():
        raw.flags.writeable = False  # as Ray's object store hands them out
    return packed


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp", "model_stock"]
)
def test_merging_from_shared_memory_equals_merging_from_disk_and_never_writes_the_sources(zoo, method):
    names = ["base", "add", "rev"] if method != "slerp" else ["base", "add"]
    paths = {n: str(zoo.model(n)) for n in names}
    params = {"linear": {"weight": 0.6}, "task_arithmetic": {"weight": 0.6}, "model_stock": {}}.get(
        method, {"weight": 0.6, "density": 0.5}
    )
    spec = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [{"model": paths[n], "parameters": params} for n in names[1:]],
        "parameters": {"t": 0.3} if method == "slerp" else {},
    }
    if method == "slerp":
        spec["models"] = [{"model": paths["base"]}, {"model": paths["add"]}]
    if method == "linear":
        del spec["base_model"]
    recipe = MergeRecipe.parse(spec)
    shared = {p: MemoryCheckpoint(read_only(pack(CheckpointReader(p)))) for p in paths.values()}
    before = {p: {n: r.get(n).clone() for n in r.names} for p, r in shared.items()}
    from_disk, from_memory = {}, {}
    execute(plan_merge(recipe), from_disk.__setitem__)
    execute(plan_merge(recipe, readers=dict(shared)), from_memory.__setitem__)
    assert from_disk.keys() == from_memory.keys()
    assert all(torch.equal(from_disk[n], from_memory[n]) for n in from_disk)
    for p, r in shared.items():
        assert all(torch.equal(before[p][n], r.get(n)) for n in r.names), f"{method} wrote to a source"


def test_packing_keeps_every_dtype_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.randn(7).to(torch.float16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).to(torch.float8_e4m3fn),
        "e": torch.tensor(1.5),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    shared = MemoryCheckpoint(pack(CheckpointReader(tmp_path)))
    for name, t in tensors.items():
        got = shared.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)) if t.dim() else got.item() == t.item()
    assert isinstance(pack(CheckpointReader(tmp_path))["tensors"]["a"][2], np.ndarray)


@pytest.mark.slow
def test_a_search_on_two_ray_workers_records_every_trial_and_evomerge_eval_agrees_on_its_best(
    tmp_path, ray_session
):
    from evomerge.export import export

    cfg = config(tmp_path)
    lines = []
    summary = search(cfg, log=lines.append)
    assert summary.trials == 12 and summary.failures == 0
    assert any("2 Ray workers ready" in line for line in lines)
    trials = Ledger(cfg.output, load_space(cfg)).trials()
    assert {t.user_attrs["worker"] for t in trials} == {"ray-0", "ray-1"}
    assert sorted(t.user_attrs["proposal"] for t in trials) == list(range(12))
    assert 0 < summary.busy_fraction <= 1
    [best] = export(cfg.output, log=lambda _: None)
    tasks = [arg for t in cfg.fitness.tasks for arg in ("--task", f"{t.name}:{t.metric}")]
    scored = subprocess.run(
        [sys.executable, "-m", "evomerge", "eval", str(best / "model"), *tasks, "--json",
         "--task-dir", str(cfg.fitness.task_dirs[0]), "--limit", "48", "--batch-size", "256"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["aggregate"] == summary.best_value  # what a worker scored


FLAKY = """
import os, pathlib, signal

def fitness(model, tokenizer):
    marks = pathlib.Path(MARKS)
    calls = len(list(marks.glob("call-*")))
    (marks / f"call-{calls}").touch()
    if calls == 2 and not (marks / "killed").exists():
        (marks / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-evaluation
    if calls == 4:
        raise RuntimeError("boom on the fifth call")
    return float(model.model.layers[0].mlp.up_proj.weight.sum())
"""


@pytest.mark.slow
def test_a_raising_candidate_fails_alone_and_a_killed_worker_is_replaced(tmp_path, ray_session, monkeypatch):
    (tmp_path / "pkg").mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "pkg" / "flaky_fit.py").write_text(f"MARKS = {str(marks)!r}\n" + FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))  # workers import it through the driver's path
    cfg = config(
        tmp_path, **{"workers.count": 2, "budget.max_evals": 8, "fitness.python": "flaky_fit:fitness"}
    )
    cfg.fitness.tasks = []
    lines = []
    summary = search(cfg, log=lines.append)
    trials = Ledger(cfg.output, load_space(cfg)).trials()
    assert summary.trials == 8 and summary.failures == 1, [t.user_attrs["error"] for t in trials]
    [failed] = [t for t in trials if t.state.name == "FAIL"]
    assert "boom on the fifth call" in failed.user_attrs["error"]
    assert any(t.user_attrs["attempts"] == 2 for t in trials)  # the killed worker's candidate, re-run
    assert any("died" in line and "starting a new one" in line for line in lines)


@pytest.mark.slow
def test_search_joins_a_ray_head_started_on_loopback(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)
        run = tmp_path / "run"
        argv = [sys.executable, "-m", "evomerge", "search", str(EXAMPLE), "--run-dir", str(run),
                "--max-evals", "3", "--workers", "1", "--ray-address", f"127.0.0.1:{port}"]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the head takes a few seconds to accept clients
            result = subprocess.run(argv, capture_output=True, text=True, env=env)
            if result.returncode == 0 or time.monotonic() > deadline or "cannot connect" not in result.stderr:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stderr
        assert "3 trials (0 failed)" in result.stdout
        status = subprocess.run(
            [sys.executable, "-m", "evomerge", "status", str(run), "--json"], capture_output=True, text=True
        )
        assert json.loads(status.stdout)["trials"] == 3
    finally:
        head.terminate()
        head.wait(timeout=60)


def test_more_workers_than_the_cluster_has_cpus_is_a_clear_error(tmp_path, ray_session):
    from evomerge.errors import EvomergeError

    cfg = config(tmp_path, **{"workers.count": 3, "workers.cpus_per_worker": 1})
    with pytest.raises(EvomergeError, match="workers.count: 3 workers need 3 CPUs but Ray has 2 free"):
        search(cfg, log=lambda _: None)


@pytest.mark.slow
def test_a_search_on_ray_workers_killed_with_sigkill_resumes_without_losing_or_repeating_a_trial(tmp_path):
    import signal

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "evomerge", "search", str(EXAMPLE), "--run-dir", str(run),
            "--max-evals", "40", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "search.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # candidates are in flight on both workers
    proc.wait()
    cfg = SearchConfig.load(run / "config.yaml", {"output": str(run)})
    killed_at = len(Ledger(run, load_space(cfg)).trials())
    assert 8 <= killed_at < 40
    resumed = subprocess.run(
        [sys.executable, "-m", "evomerge", "resume", str(run)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    trials = Ledger(run, load_space(cfg)).trials()
    assert len(trials) == 40
    assert sorted(t.user_attrs["proposal"] for t in trials) == list(range(40))  # none lost, none twice
