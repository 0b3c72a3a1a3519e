import random
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge import merge_to_state_dict
from evomerge.recipe import MergeRecipe
from evomerge.space import SearchSpace, SpaceSpec
from evomerge.zoo.table import load_state

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))


def experts_for(path, zoo):
    names = ["add"] if "slerp" in path.name else ["add", "rev"]
    return {n: zoo.model(n) for n in names}


def test_gene_names_are_stable_and_readable(zoo):
    spec = SpaceSpec(
        merge_method="task_arithmetic",
        layer_granularity=2,
        parameters={"weight": {"low": 0, "high": 2, "scope": ["group", "block", "model"]}},
    )
    space = SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add")})
    names = [g.name for g in space.genes]
    assert (
        "layers_00_01.mlp.expert_add.weight" in names and "layers_02_03.attention.expert_add.weight" in names
    )
    assert "embed.other.expert_add.weight" in names and "head.other.expert_add.weight" in names
    assert len(names) == len(set(names)) == 2 * 3 + 2  # 2 groups x 3 blocks + embeddings + head


def test_decoded_genes_land_in_the_right_tensors(zoo):
    """A genome with distinct per-layer, per-expert weights merges exactly like a hand-made recipe."""
    spec = SpaceSpec(
        merge_method="task_arithmetic",
        parameters={"weight": {"low": 0.0, "high": 2.0, "scope": ["group", "model"]}},
    )
    experts = {"add": zoo.model("add"), "rev": zoo.model("rev")}
    space = SearchSpace(spec, zoo.model("base"), experts)
    rng = random.Random(0)
    genome = space.random(rng)
    merged = merge_to_state_dict(space.decode(genome))
    s = {n: load_state(zoo.model(n)) for n in ["base", "add", "rev"]}

    def w(group, expert):
        return 2.0 * genome[f"{group}.expert_{expert}.weight"]

    for name, group in [
        ("model.layers.2.mlp.up_proj.weight", "layers_02_02"),
        ("model.layers.0.self_attn.q_proj.weight", "layers_00_00"),
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "head"),
        ("model.norm.weight", "head"),
    ]:
        b = s["base"][name]
        expected = b + w(group, "add") * (s["add"][name] - b) + w(group, "rev") * (s["rev"][name] - b)
        assert torch.allclose(merged[name], expected, atol=1e-5), name


def test_bounds_and_log_scale_are_respected():
    spec = SpaceSpec(
        merge_method="ties",
        parameters={"density": {"low": 0.01, "high": 1.0, "scale": "log"}, "weight": {"low": -1, "high": 1}},
    )
    d, w = spec.parameters["density"], spec.parameters["weight"]
    assert d.decode(0.0) == pytest.approx(0.01) and d.decode(1.0) == pytest.approx(1.0)
    assert d.decode(0.5) == pytest.approx(0.1)  # geometric midpoint
    assert w.decode(-3) == -1 and w.decode(7) == 1  # clipped
    assert d.encode(d.decode(0.3)) == pytest.approx(0.3)


def test_space_errors_name_the_file_and_key(zoo, tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "parameters": {"t": {"low": 0, "high": 1}}}))
    with pytest.raises(EvomergeError, match=r"s.yaml: .*parameter 't' is not one of ties's"):
        SearchSpace.load(bad, zoo.model("base"), {"a": zoo.model("add")})
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "parameters": {"weight": {"low": 1, "high": 0}}}))
    with pytest.raises(EvomergeError, match=r"s.yaml: parameters.weight: low \(1.0\) must be below high"):
        SearchSpace.load(bad, zoo.model("base"), {"a": zoo.model("add")})


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_decodes_to_a_recipe_both_engines_accept(path, zoo):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), "each space starts with a comment saying when to use it"
    space = SearchSpace.load(path, zoo.model("base"), experts_for(path, zoo))
    from evomerge.optimizers import OPTIMIZERS, make_optimizer

    assert space.spec.optimizer in OPTIMIZERS
    make_optimizer(space.spec.optimizer, space)  # the recommended optimizer accepts the space
    for genome in [space.initial(), space.random(random.Random(1))]:
        recipe = space.decode(genome, seed=3)
        assert len(merge_to_state_dict(recipe)) == 39
        again = MergeRecipe.parse(yaml.safe_load(recipe.to_yaml()))
        assert again == recipe
        mergekit_config = pytest.importorskip("mergekit.config")
        mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
