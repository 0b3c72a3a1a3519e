import random

import pytest

from evomerge.errors import EvomergeError
from evomerge.optimizers import OPTIMIZERS, make_optimizer
from evomerge.space import SearchSpace, SpaceSpec


@pytest.fixture(scope="module")
def space(zoo):
    spec = SpaceSpec(
        merge_method="task_arithmetic",
        parameters={"weight": {"low": 0.0, "high": 1.5, "scope": ["group", "model"], "initial": 1.0}},
    )
    return SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add"), "rev": zoo.model("rev")})


def target(space):
    return {g.name: 0.15 + 0.7 * i / (space.dimension - 1) for i, g in enumerate(space.genes)}


def sq_distance(genome, centre):
    return sum((genome[k] - c) ** 2 for k, c in centre.items())


def noisy_sphere(space):
    """A shifted sphere with noise, maximized (like a merge landscape: bounded, noisy)."""
    centre = target(space)

    def f(pid, genome):
        return -sq_distance(genome, centre) + random.Random(pid).gauss(0, 0.01)

    return f


def run(opt, f, budget, batch=4):
    proposals, done = [], 0
    while done < budget:
        asked = opt.ask(min(batch, budget - done))
        assert asked, "the optimizer proposed nothing"
        for p in asked:
            proposals.append(p.genome)
            opt.tell(p.id, [f(p.id, p.genome)])
            done += 1
    return proposals


BUDGETS = {"cma": 300, "tpe": 150, "optuna-cmaes": 300, "nsga2": 300, "gp": 40, "random": 300, "qmc": 300}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_backend_improves_a_noisy_shifted_sphere_well_beyond_its_start(space, name):
    centre = target(space)
    start = sq_distance(space.initial(), centre)
    proposals = run(make_optimizer(name, space, seed=0), noisy_sphere(space), BUDGETS[name])
    best = min(sq_distance(g, centre) for g in proposals)
    factor = 0.5 if name in ("random", "qmc", "nsga2", "gp") else 0.2  # model-based ones do much better
    assert best < factor * start, (name, best, start)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_same_seed_gives_the_same_proposals(space, name):
    budget = 12 if name == "gp" else 24
    a = run(make_optimizer(name, space, seed=3), noisy_sphere(space), budget)
    b = run(make_optimizer(name, space, seed=3), noisy_sphere(space), budget)
    assert a == b
    c = run(make_optimizer(name, space, seed=4), noisy_sphere(space), budget)
    assert a != c


@pytest.mark.parametrize("name", ["cma", "tpe", "optuna-cmaes", "random", "nsga2"])
def test_restore_of_state_continues_exactly_as_the_uninterrupted_optimizer(space, name):
    f = noisy_sphere(space)
    one = make_optimizer(name, space, seed=1)
    run(one, f, 20)
    saved = one.state()
    rest = run(one, f, 20)
    two = make_optimizer(name, space, seed=999)  # whatever it was built with, restore wins
    two.restore(saved)
    assert run(two, f, 20) == rest


def test_failures_are_told_as_failures_not_crashes(space):
    for name in ["cma", "tpe"]:
        opt = make_optimizer(name, space, seed=0)
        for _ in range(3):
            for p in opt.ask(4):
                opt.tell(p.id, None)
        assert opt.ask(1)


def test_cma_rejects_categorical_genes_with_a_clear_error(zoo):
    spec = SpaceSpec(
        merge_method=["ties", "task_arithmetic"],
        parameters={"weight": {"low": 0.0, "high": 1.0}},
    )
    space = SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add")})
    with pytest.raises(EvomergeError, match="cma cannot search categorical gene 'merge_method'"):
        make_optimizer("cma", space)
    proposals = run(make_optimizer("tpe", space, seed=0), lambda pid, g: g["weight"], 10)
    assert {p["merge_method"] for p in proposals} <= {"ties", "task_arithmetic"}


def test_cma_never_starves_workers_and_steps_on_the_first_popsize_results(space):
    opt = make_optimizer("cma", space, seed=0, popsize=6)
    first = opt.ask(10)  # more than a generation: 4 extra members from the same distribution
    assert len(first) == 10 and len({tuple(p.genome.values()) for p in first}) == 10
    mean = opt.es.mean.copy()
    for p in first[:5]:
        opt.tell(p.id, [0.0])
    assert (opt.es.mean == mean).all()  # 5 of 6 results: no step yet
    opt.tell(first[9].id, [1.0])  # the sixth result, from an extra member, completes the step
    assert opt.generation_number == 2 and not (opt.es.mean == mean).all()
    for p in first[5:9]:  # late: recorded by the caller, ignored by the distribution
        opt.tell(p.id, [5.0])
    assert opt.late == 4 and not opt.outstanding
    assert len(opt.ask(3)) == 3


def test_asynchronous_tells_in_any_order_replay_exactly(space):
    f = noisy_sphere(space)
    for name in ["cma", "tpe", "optuna-cmaes"]:
        one = (
            make_optimizer(name, space, seed=2, popsize=5)
            if name == "cma"
            else make_optimizer(name, space, seed=2)
        )
        rng = random.Random(0)
        for _ in range(30):  # two workers: keep two out, tell a random one back
            while len(one.outstanding) < 2:
                one.ask(1)
            pid = rng.choice(sorted(one.outstanding))
            one.tell(pid, [f(pid, one.outstanding[pid].genome)])
        two = make_optimizer(name, space, seed=0)
        two.restore(one.state())
        assert two.outstanding == one.outstanding
        assert two.ask(3) == one.ask(3), name


def test_telling_an_unknown_proposal_is_a_clear_error(space):
    opt = make_optimizer("tpe", space, seed=0)
    [p] = opt.ask(1)
    opt.tell(p.id, [1.0])
    with pytest.raises(EvomergeError, match=f"proposal {p.id} was never asked for, or was told already"):
        opt.tell(p.id, [1.0])


def test_unknown_optimizer_is_a_clear_error(space):
    with pytest.raises(EvomergeError, match="unknown optimizer 'cmaes'; choose one of cma, tpe"):
        make_optimizer("cmaes", space)
