import json
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger
from evomerge.search import load_space, search

EXAMPLE = Path(__file__).parent.parent / "examples" / "zoo-search.yaml"


def config(tmp_path, **overrides):
    """The demo config, in-process (these tests are about the loop; tests/test_pool.py runs Ray)."""
    base = {"output": str(tmp_path / "run"), "budget.max_evals": 12, "fitness.limit": 48, "workers.count": 0}
    base.update(overrides)
    return SearchConfig.load(EXAMPLE, base)


def trial_rows(run_dir: Path, cfg):
    ledger = Ledger(run_dir, load_space(cfg))
    return [(t.params, t.values, t.user_attrs.get("recipe")) for t in ledger.trials()]


@pytest.mark.slow
def test_a_short_search_records_every_trial_and_its_best_recipe_reproduces(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Fitness
    from evomerge.merge import merge_into_model
    from evomerge.recipe import MergeRecipe

    cfg = config(tmp_path)
    summary = search(cfg, log=lambda _: None)
    assert summary.trials == 12 and summary.failures == 0
    ledger = Ledger(cfg.output, load_space(cfg))
    best = ledger.best()
    assert best.values[0] == summary.best_value
    assert json.loads(best.user_attrs["metrics"])["zoo_add_ll"]["acc,none"] >= 0
    model = AutoModelForCausalLM.from_pretrained(cfg.models.base).eval()
    fitness = Fitness(model, AutoTokenizer.from_pretrained(cfg.models.base), cfg.fitness)
    merge_into_model(MergeRecipe.load(summary.best_recipe), model)
    assert fitness().objectives == [summary.best_value]  # the exported recipe is what was scored


@pytest.mark.slow
def test_an_interrupted_and_resumed_search_ends_with_the_same_trials(tmp_path):
    straight = config(tmp_path / "a")
    search(straight, log=lambda _: None)

    interrupted = config(tmp_path / "b")

    def crash(n):
        if n == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(interrupted, log=lambda _: None, evaluate_hook=crash)
    assert len(trial_rows(interrupted.output, interrupted)) == 5
    search(interrupted, resume=True, log=lambda _: None)
    assert trial_rows(interrupted.output, interrupted) == trial_rows(straight.output, straight)


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    (tmp_path / "flaky_fitness.py").write_text(
        "calls = [0]\n"
        "def f(model, tokenizer):\n"
        "    calls[0] += 1\n"
        "    if calls[0] % 3 == 0:\n"
        "        raise RuntimeError('out of luck')\n"
        "    return 0.1 * calls[0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(tmp_path, **{"fitness.python": "flaky_fitness:f", "budget.max_evals": 6})
    cfg.fitness.tasks = []
    summary = search(cfg, log=lambda _: None)
    assert summary.trials == 6 and summary.failures == 2
    errors = [
        t.user_attrs["error"] for t in Ledger(cfg.output, load_space(cfg)).trials() if t.state.name == "FAIL"
    ]
    assert all("out of luck" in e for e in errors)


def test_a_second_search_on_the_same_run_directory_is_refused(tmp_path):
    cfg = config(tmp_path, **{"budget.max_evals": 1})
    search(cfg, log=lambda _: None)
    with pytest.raises(EvomergeError, match="holds a search already; `evomerge resume"):
        search(cfg, log=lambda _: None)


def test_config_errors_name_the_key_and_suggest_the_closest(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(EXAMPLE.read_text().replace("budget: {max_evals: 300}", "budget: {max_eval: 300}"))
    with pytest.raises(
        EvomergeError, match=r"c.yaml: budget.max_eval: unknown key; did you mean 'max_evals'\?"
    ):
        SearchConfig.load(bad)
    bad.write_text(EXAMPLE.read_text().replace("budget: {max_evals: 300}", "budget: {time_limit: soon}"))
    with pytest.raises(EvomergeError, match="budget.time_limit: cannot read duration 'soon'"):
        SearchConfig.load(bad)


@pytest.mark.slow
def test_search_cli_then_status(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "search", str(EXAMPLE), "--run-dir", str(run), "--max-evals", "4",
         "--workers", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 trials (0 failed)" in result.stdout
    status = subprocess.run(
        [sys.executable, "-m", "evomerge", "status", str(run), "--json"], capture_output=True, text=True
    )
    assert json.loads(status.stdout)["trials"] == 4


@pytest.mark.slow
def test_export_writes_a_loadable_checkpoint_that_the_recipe_reproduces_bit_for_bit(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoint import CheckpointReader
    from evomerge.export import export
    from evomerge.merge import merge_to_state_dict

    cfg = config(tmp_path, **{"budget.max_evals": 6})
    search(cfg, log=lambda _: None)
    [best] = export(cfg.output, log=lambda _: None)
    model_dir = best / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).decode([70, 71]) == "ab"
    again = merge_to_state_dict(best / "recipe.yaml")
    reader = CheckpointReader(model_dir)
    assert all(torch.equal(reader.get(n), t) for n, t in again.items())
    card = (best / "README.md").read_text()
    assert "Held-out scores" in card and "expert add" in card and "merge_method:" in card
    assert (cfg.output / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_search_killed_with_sigkill_resumes_to_the_full_budget_without_losing_a_trial(tmp_path):
    import os
    import signal
    import time

    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "evomerge",
        "search",
        str(EXAMPLE),
        "--run-dir",
        str(run),
        "--max-evals",
        "30",
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "search.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = SearchConfig.load(run / "config.yaml", {"output": str(run)})
    killed_at = len(trial_rows(run, cfg))
    assert 5 <= killed_at < 30
    resumed = subprocess.run(
        [sys.executable, "-m", "evomerge", "resume", str(run)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = trial_rows(run, cfg)
    assert len(rows) == 30
    straight = tmp_path / "straight"
    done = subprocess.run([*argv[:6], str(straight), *argv[7:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert rows == trial_rows(straight, cfg)  # the same trials as a run that was never killed


def test_the_ledger_can_live_in_any_optuna_storage(tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = config(tmp_path, **{"budget.max_evals": 2, "storage": url})
    search(cfg, log=lambda _: None)
    assert not (cfg.output / "study.db").exists()
    assert len(Ledger(cfg.output, load_space(cfg), storage=url).trials()) == 2
    status = CliRunner().invoke(app, ["status", str(cfg.output), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["trials"] == 2


@pytest.mark.slow
def test_a_search_with_a_method_per_layer_group_exports_a_staged_recipe_that_reproduces(tmp_path):
    import torch

    from evomerge.checkpoint import CheckpointReader
    from evomerge.export import export
    from evomerge.merge import merge_to_state_dict
    from evomerge.recipe import StagedRecipe, load_recipe

    space = Path(__file__).parent.parent / "search_spaces" / "method_choice.yaml"
    cfg = config(tmp_path, **{"space": str(space), "optimizer.name": "random", "budget.max_evals": 6})
    summary = search(cfg, log=lambda _: None)
    assert summary.trials == 6 and summary.failures == 0
    decoded = [load_space(cfg).decode(t.params, seed=0) for t in Ledger(cfg.output, load_space(cfg)).trials()]
    assert any(isinstance(r, StagedRecipe) for r in decoded)  # random methods per group: mixed
    [best] = export(cfg.output, log=lambda _: None)
    recipe = load_recipe(best / "recipe.yaml")
    again = merge_to_state_dict(best / "recipe.yaml")
    reader = CheckpointReader(best / "model")
    assert sorted(again) == sorted(reader.names)
    assert all(torch.equal(reader.get(n), t) for n, t in again.items())
    card = (best / "README.md").read_text()
    assert ("mergekit-multi" in card) == isinstance(recipe, StagedRecipe)
