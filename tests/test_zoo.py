import filecmp
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import EvomergeError
from evomerge.zoo import load_zoo
from evomerge.zoo.build import build_zoo
from evomerge.zoo.score import greedy_correct
from evomerge.zoo.skills import Example, make_splits
from evomerge.zoo.tasks import FIT, HELDOUT, read_split, task_names
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.verify import verify_zoo

# -- skills and tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "skill,check",
    [
        ("add", lambda p, a: eval(p[4:-1]) == int(a)),
        ("rev", lambda p, a: p[4:-1][::-1] == a and 4 <= len(a) <= 8),
        ("sort", lambda p, a: "".join(sorted(p[5:-1])) == a),
        ("ar", lambda p, a: a == f"{eval(p[3:-1].split('|')[0])}|{p[3:-1].split('|')[1][::-1]}"),
    ],
)
def test_generated_examples_have_correct_answers(skill, check):
    for ex in make_splits(skill, {"x": 50}, seed=3)["x"]:
        assert ex.prompt.endswith("=") and check(ex.prompt, ex.answer), ex


def test_splits_are_disjoint_and_deterministic():
    a = make_splits("add", {FIT: 256, HELDOUT: 200}, seed=0)
    assert make_splits("add", {FIT: 256, HELDOUT: 200}, seed=0) == a
    assert make_splits("add", {FIT: 256, HELDOUT: 200}, seed=1) != a
    fit, held = {e.prompt for e in a[FIT]}, {e.prompt for e in a[HELDOUT]}
    assert len(fit) == 256 and len(held) == 200 and not fit & held


def test_tokenizer_is_one_token_per_character_without_specials(tmp_path):
    tok = build_tokenizer()
    text = "add:23+45=68\nrev:ab cd=dc ba|~"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(text) == ids and loaded.pad_token_id != loaded.eos_token_id


# -- building --------------------------------------------------------------------------------


def test_quick_zoo_has_every_model_and_task(quick_zoo):
    m = quick_zoo.manifest
    assert m["synthetic"] and m["quick"]
    assert set(m["models"]) == {"base", "add", "rev", "add_short", "rev_short", "add_noreplay"}
    for name in m["models"]:
        path = quick_zoo.model(name)
        assert CheckpointReader(path).num_layers == m["shape"]["num_hidden_layers"]
        AutoTokenizer.from_pretrained(path)
        assert AutoModelForCausalLM.from_pretrained(path).num_parameters() == m["parameters"]
    for skill in m["skills"]:
        for task in task_names(skill).values():
            assert (quick_zoo.tasks / f"{task}.yaml").is_file()
        assert read_split(quick_zoo.tasks, skill, FIT) and read_split(quick_zoo.tasks, skill, HELDOUT)


def test_quick_zoo_passes_its_own_verification(quick_zoo):
    assert verify_zoo(quick_zoo)


def test_short_experts_are_snapshots_of_the_longer_runs(quick_zoo):
    m = quick_zoo.manifest["models"]
    assert m["add_short"]["steps"] < m["add"]["steps"]
    base = CheckpointReader(quick_zoo.model("base")).get("lm_head.weight")
    short = CheckpointReader(quick_zoo.model("add_short")).get("lm_head.weight")
    full = CheckpointReader(quick_zoo.model("add")).get("lm_head.weight")
    assert not torch.equal(base, short) and not torch.equal(short, full)


@pytest.mark.slow
def test_zoo_build_cli_rebuilds_bit_for_bit(quick_zoo, tmp_path):
    out = tmp_path / "again"
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "zoo", "build", str(out), "--quick"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    for name in quick_zoo.model_names:
        for file in ["model.safetensors", "config.json", "tokenizer.json"]:
            assert filecmp.cmp(quick_zoo.model(name) / file, out / name / file, shallow=False), (name, file)
    for f in (quick_zoo.tasks / "data").iterdir():
        assert filecmp.cmp(f, out / "tasks" / "data" / f.name, shallow=False)
    first = json.loads((quick_zoo.root / "zoo.json").read_text())
    second = json.loads((out / "zoo.json").read_text())
    first.pop("build_seconds"), second.pop("build_seconds")
    assert first == second


def test_build_refuses_an_existing_directory_and_cleans_up_after_a_failure(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        build_zoo(tmp_path / "taken", quick=True)

    def fail_while_training(line):
        if line.startswith("expert"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", quick=True, log=fail_while_training)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


# -- the shipped zoo ---------------------------------------------------------------------------


def test_shipped_zoo_is_small_enough_to_ship(zoo):
    total = sum(f.stat().st_size for f in zoo.root.rglob("*") if f.is_file())
    assert total < 25 * 1024**2


@pytest.mark.slow
def test_shipped_zoo_loads_rescores_as_recorded_and_experts_specialise(zoo):
    lines = verify_zoo(zoo)  # raises on any failure
    assert any(line.startswith("expert add:") for line in lines)
    m = zoo.manifest["models"]
    for name in zoo.expert_set("mergeable"):
        own = m[name]["skill"]
        assert m[name]["heldout_accuracy"][own] > m["base"]["heldout_accuracy"][own] + 0.5


def test_expert_without_replay_forgot_a_base_skill(zoo):
    m = zoo.manifest["models"]
    assert m["base"]["heldout_accuracy"]["sort"] >= 0.9
    assert m["add_noreplay"]["heldout_accuracy"]["sort"] < 0.5 * m["base"]["heldout_accuracy"]["sort"]
    # replay kept much of it
    assert m["add"]["heldout_accuracy"]["sort"] > m["add_noreplay"]["heldout_accuracy"]["sort"] + 0.4


def test_missing_zoo_is_a_clear_error(tmp_path):
    with pytest.raises(EvomergeError, match="not a zoo directory"):
        load_zoo(tmp_path)


# -- the tasks in lm-eval ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_run(zoo, monkeypatch_module):
    """Runs lm-eval on the shipped `add` expert, the way a user would from the task directory."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch_module.chdir(zoo.tasks)  # lm-eval resolves data_files against the cwd
    path = zoo.model("add")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=64)
    tasks = TaskManager(include_path=str(zoo.tasks), include_defaults=False)
    names = ["zoo_add_heldout", "zoo_add_ll_heldout", "zoo_rev_ll_heldout"]
    results = simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True)
    return model, tokenizer, results


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_lm_eval_loglikelihood_acc_equals_our_greedy_scorer_per_example(zoo, lm_eval_run):
    model, tokenizer, results = lm_eval_run
    for skill in ["add", "rev"]:
        examples = read_split(zoo.tasks, skill, HELDOUT)
        ours = greedy_correct(model, tokenizer, examples)
        samples = results["samples"][f"zoo_{skill}_ll_heldout"]
        theirs = {s["doc"]["prompt"]: s["acc"] for s in samples}
        assert len(theirs) == len(examples) == 200
        assert [bool(theirs[e.prompt]) for e in examples] == ours
        assert results["results"][f"zoo_{skill}_ll_heldout"]["acc,none"] == pytest.approx(sum(ours) / 200)


@pytest.mark.slow
def test_lm_eval_generation_exact_match_equals_the_loglikelihood_form(lm_eval_run):
    _, _, results = lm_eval_run
    generated = {s["doc"]["prompt"]: s["exact_match"] for s in results["samples"]["zoo_add_heldout"]}
    greedy = {s["doc"]["prompt"]: s["acc"] for s in results["samples"]["zoo_add_ll_heldout"]}
    assert generated == greedy
    assert results["results"]["zoo_add_heldout"]["exact_match,none"] > 0.8


def test_greedy_scorer_needs_the_whole_answer_and_then_a_newline():
    """Greedy decoding stopped at the newline: "1" is wrong when the model would go on to "12"."""
    tok = build_tokenizer()
    plan = tok.encode("add:1+1=12\n")

    class Scripted(torch.nn.Module):  # always predicts the next character of `plan`
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, len(tok))
            for j in range(min(input_ids.shape[1], len(plan) - 1)):
                logits[:, j, plan[j + 1]] = 1.0
            return type("Out", (), {"logits": logits})

    examples = [Example("add:1+1=", "12"), Example("add:1+1=", "1"), Example("add:1+1=", "13")]
    assert greedy_correct(Scripted(), tok, examples) == [True, False, False]


# -- the zoo makes merging matter (on the shipped weights) --------------------------------------


@pytest.fixture(scope="module")
def zoo_scorer(zoo):
    from evomerge.zoo.table import Scorer, load_state

    return Scorer(zoo), {name: load_state(zoo.model(name)) for name in zoo.model_names}


def _pair_mean(zoo, scores, set_name):
    from evomerge.zoo.table import mean_of

    skills = [zoo.manifest["models"][e]["skill"] for e in zoo.expert_set(set_name)]
    return mean_of(scores, skills)


@pytest.mark.slow
def test_plain_task_arithmetic_beats_every_mergeable_expert_on_their_skills(zoo, zoo_scorer):
    from evomerge.zoo.table import task_arithmetic

    scorer, states = zoo_scorer
    names = zoo.expert_set("mergeable")
    best_expert = max(_pair_mean(zoo, scorer.score(states[n]), "mergeable") for n in names)
    merged = task_arithmetic(states["base"], [states[n] for n in names], lambda i, g: 1.0)
    assert _pair_mean(zoo, scorer.score(merged), "mergeable") > best_expert + 0.05


@pytest.mark.slow
def test_no_uniform_merge_of_the_hard_experts_beats_them_but_per_layer_choices_matter(zoo, zoo_scorer):
    import random

    from evomerge.zoo.table import layer_group, task_arithmetic

    scorer, states = zoo_scorer
    names = zoo.expert_set("hard")
    experts = [states[n] for n in names]
    best_expert = max(_pair_mean(zoo, scorer.score(s), "hard") for s in experts)
    for lam in (0.5, 0.75, 1.0, 1.25):
        merged = task_arithmetic(states["base"], experts, lambda i, g, lam=lam: lam)
        assert _pair_mean(zoo, scorer.score(merged), "hard") < best_expert, lam
    rng = random.Random(0)
    groups = sorted({layer_group(n) for n in states["base"]})
    means = []
    for _ in range(8):
        coef = {(i, g): rng.uniform(0.0, 1.5) for i in range(2) for g in groups}
        merged = task_arithmetic(states["base"], experts, lambda i, g, c=coef: c[(i, g)])
        means.append(_pair_mean(zoo, scorer.score(merged), "hard"))
    assert max(means) - min(means) > 0.2  # the per-layer coefficients move the score a lot
