import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvomergeError
from evomerge.fitness import Fitness, FitnessSpec
from evomerge.fitness.aggregate import objectives, pick
from evomerge.fitness.lm_eval_tasks import check_task_dirs, subset, task_specs_from_cli
from evomerge.zoo.score import greedy_correct
from evomerge.zoo.tasks import FIT, read_split

# -- aggregation -------------------------------------------------------------------------------------


def spec(**kw):
    base = {"tasks": [{"name": "a"}, {"name": "b", "metric": "exact_match,strip", "weight": 2.0}]}
    base.update(kw)
    return FitnessSpec(**base)


METRICS = {"a": {"acc,none": 0.5, "acc_stderr,none": 0.1}, "b": {"exact_match,strip": 0.25}}


def test_weighted_objective_is_the_weighted_sum_of_the_named_metrics():
    assert objectives(METRICS, spec()) == [0.5 + 2.0 * 0.25]
    assert objectives(METRICS, spec(), {"custom": 1.0}) == [2.0]


def test_separate_objectives_keep_one_value_per_task_in_order():
    assert objectives(METRICS, spec(objectives="separate")) == [0.5, 0.25]


def test_a_bare_metric_means_the_none_filter():
    assert pick(METRICS, spec())["a"] == 0.5


def test_a_missing_metric_names_the_available_ones():
    s = spec(tasks=[{"name": "a", "metric": "f1"}])
    with pytest.raises(EvomergeError, match=r"task a: no metric 'f1,none'; available: acc,none$"):
        pick(METRICS, s)


def test_spec_validation():
    with pytest.raises(ValueError, match="at least one task or a python function"):
        FitnessSpec()
    with pytest.raises(ValueError, match="package.module:function"):
        FitnessSpec(python="just_a_module")
    with pytest.raises(ValueError, match="listed twice"):
        FitnessSpec(tasks=[{"name": "a"}, {"name": "a"}])


def test_cli_task_strings():
    specs = task_specs_from_cli(["t", "u:exact_match", "v:acc:0.5"])
    assert [(s.name, s.metric_key, s.weight) for s in specs] == [
        ("t", "acc,none", 1.0),
        ("u", "exact_match,none", 1.0),
        ("v", "acc,none", 0.5),
    ]
    with pytest.raises(EvomergeError, match="weight 'x' is not a number"):
        task_specs_from_cli(["v:acc:x"])


def test_the_subset_is_seeded_and_the_same_every_time():
    assert subset(100, 10, 1, "t") == subset(100, 10, 1, "t")
    assert subset(100, 10, 1, "t") != subset(100, 10, 2, "t")
    assert subset(100, None, 1, "t") is None and subset(5, 10, 1, "t") is None


# -- lm-eval on a resident model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def add_model(zoo):
    path = zoo.model("add")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def fitness(zoo, add_model):
    model, tokenizer = add_model
    s = FitnessSpec(
        tasks=[{"name": "zoo_add_ll"}, {"name": "zoo_rev_ll"}, {"name": "zoo_sort", "metric": "exact_match"}],
        task_dirs=[zoo.tasks],
        limit=64,
    )
    return Fitness(model, tokenizer, s)


def test_resident_scores_equal_our_greedy_scorer_on_the_same_subset(zoo, fitness, add_model):
    model, tokenizer = add_model
    result = fitness()
    assert result.ok, result.error
    for skill in ["add", "rev"]:
        docs = read_split(zoo.tasks, skill, FIT)
        chosen = [docs[i] for i in subset(len(docs), 64, fitness.spec.seed, f"zoo_{skill}_ll")]
        hits = greedy_correct(model, tokenizer, chosen)
        assert result.metrics[f"zoo_{skill}_ll"]["acc,none"] == pytest.approx(sum(hits) / 64)
    assert result.metrics["zoo_add_ll"]["acc,none"] > 0.9 and result.metrics["zoo_rev_ll"]["acc,none"] < 0.1


@pytest.mark.slow
def test_resident_scores_equal_lm_eval_simple_evaluate(zoo, add_model, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = add_model
    names = ["zoo_add_ll", "zoo_sort_ll_heldout", "zoo_rev"]
    ours = Fitness(
        model, tokenizer, FitnessSpec(tasks=[{"name": n} for n in names], task_dirs=[zoo.tasks])
    ).scorer()
    monkeypatch.chdir(zoo.tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=64)
    theirs = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(zoo.tasks)))
    for n in names:
        for key, value in ours[n].items():
            assert theirs["results"][n][key] == pytest.approx(value), (n, key)


def test_changing_weights_changes_the_score_and_unchanged_weights_repeat_it_exactly(fitness):
    first = fitness()
    assert fitness().metrics == first.metrics
    model = fitness.model
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    try:
        assert fitness().objectives != first.objectives
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert fitness().metrics == first.metrics


def test_relative_data_files_resolve_against_the_yaml_folder_from_any_cwd(
    zoo, add_model, tmp_path, monkeypatch
):
    tasks = tmp_path / "my_tasks"
    shutil.copytree(zoo.tasks, tasks)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, tokenizer = add_model
    result = Fitness(
        model, tokenizer, FitnessSpec(tasks=[{"name": "zoo_add_ll"}], task_dirs=[tasks], limit=8)
    )()
    assert result.ok and result.metrics["zoo_add_ll"]["acc,none"] > 0.5


def test_a_broken_task_yaml_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "good.yaml").write_text("task: x\nprocess_results: !function utils.process\n")
    check_task_dirs([tmp_path])  # !function tags are fine
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(EvomergeError, match=r"bad.yaml: invalid task YAML"):
        check_task_dirs([tmp_path])


def test_an_unknown_task_is_a_clear_error(zoo, add_model):
    model, tokenizer = add_model
    with pytest.raises(EvomergeError, match="unknown task 'zoo_nope'"):
        Fitness(model, tokenizer, FitnessSpec(tasks=[{"name": "zoo_nope"}], task_dirs=[zoo.tasks]))


# -- Python fitness --------------------------------------------------------------------------------


def _install_module(tmp_path, monkeypatch, body):
    (tmp_path / "user_fitness.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_fitness", None)


@pytest.mark.parametrize(
    "body,objective,error",
    [
        ("def f(model, tokenizer):\n    return 0.25\n", [0.25], None),
        ("def f(model, tokenizer):\n    return {'a': 1.0, 'b': 2}\n", [3.0], None),
        (
            "def f(model, tokenizer):\n    raise ValueError('boom')\n",
            None,
            "python fitness raised ValueError: boom",
        ),
        ("def f(model, tokenizer):\n    return float('nan')\n", None, "is nan, not a finite number"),
        ("def f(model, tokenizer):\n    return 'high'\n", None, "returned str"),
    ],
)
def test_python_fitness_results_and_failures_are_recorded_not_raised(
    tmp_path, monkeypatch, body, objective, error
):
    _install_module(tmp_path, monkeypatch, body)
    result = Fitness(torch.nn.Linear(1, 1), None, FitnessSpec(python="user_fitness:f"))()
    assert result.objectives == objective
    assert (result.error is None) if error is None else (error in result.error)


def test_python_fitness_that_cannot_be_imported_fails_at_set_up(tmp_path, monkeypatch):
    _install_module(tmp_path, monkeypatch, "x = 1\n")
    with pytest.raises(EvomergeError, match="has no function 'f'"):
        Fitness(None, None, FitnessSpec(python="user_fitness:f"))
    with pytest.raises(EvomergeError, match="cannot import no_such_module"):
        Fitness(None, None, FitnessSpec(python="no_such_module:f"))


# -- the command -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_cli_prints_json_with_metrics_and_aggregate(zoo):
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "eval", str(zoo.model("rev")), "--task", "zoo_rev_ll:acc:2",
         "--task", "zoo_add_ll", "--task-dir", str(zoo.tasks), "--limit", "32", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    rev, add = payload["metrics"]["zoo_rev_ll"]["acc,none"], payload["metrics"]["zoo_add_ll"]["acc,none"]
    assert rev > 0.9 and add < 0.1
    assert math.isclose(payload["aggregate"], 2 * rev + add)
