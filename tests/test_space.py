import random
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge import merge_to_state_dict
from evomerge.recipe import MergeRecipe, StagedRecipe, parse_recipe
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
        allow_negative_weights=True,
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
        documents = list(yaml.safe_load_all(recipe.to_yaml()))
        assert parse_recipe(documents) == recipe
        import mergekit.config as mergekit_config

        for doc in documents:  # a staged recipe: mergekit-multi's documents, each a mergekit config
            doc.pop("name", None)
            mergekit_config.MergeConfiguration.model_validate(doc)


def test_a_method_per_layer_group_decodes_to_stages_and_a_passthrough(zoo):
    spec = SpaceSpec(
        merge_method=["task_arithmetic", "ties"],
        method_scope="group",
        layer_granularity=1,
        parameters={"weight": {"low": 0, "high": 1, "scope": ["model"]}, "density": {"low": 0, "high": 1}},
    )
    space = SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add"), "rev": zoo.model("rev")})
    names = [g.name for g in space.genes if g.categorical]
    assert names == ["layers_00_00.merge_method", "layers_01_01.merge_method", "layers_02_02.merge_method",
                     "layers_03_03.merge_method"]  # fmt: skip
    genome = {**space.initial(), "expert_add.weight": 0.8, "expert_rev.weight": 0.6, "density": 0.5}
    assert isinstance(space.decode(genome), MergeRecipe)  # one method everywhere: one plain recipe
    genome.update({"layers_01_01.merge_method": "ties", "layers_02_02.merge_method": "ties"})
    staged = space.decode(genome)
    assert isinstance(staged, StagedRecipe) and list(staged.stages) == ["stage_task_arithmetic", "stage_ties"]
    assert "density" not in str(staged.stages["stage_task_arithmetic"].to_dict())  # only where it applies
    slices = [(s.sources[0].model, tuple(s.sources[0].layer_range)) for s in staged.final.slices]
    assert slices == [
        ("stage_task_arithmetic", (0, 1)),
        ("stage_ties", (1, 3)),
        ("stage_task_arithmetic", (3, 4)),
    ]
    merged = merge_to_state_dict(staged)
    ta = merge_to_state_dict(space.decode({**genome, **{g: "task_arithmetic" for g in names}}))
    ties = merge_to_state_dict(space.decode({**genome, **{g: "ties" for g in names}}))
    for name, tensor in merged.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        expected = ties if layer in ("1", "2") else ta  # embeddings: first group; head: last group
        assert torch.equal(tensor, expected[name]), name


def test_negative_weights_need_to_be_allowed_and_normalize_is_a_shorthand(zoo):
    from pydantic import ValidationError

    params = {"weight": {"low": -0.5, "high": 1.0}}
    with pytest.raises(ValidationError, match="set allow_negative_weights: true"):
        SpaceSpec(merge_method="task_arithmetic", parameters=params)
    spec = SpaceSpec(merge_method="ties", parameters=params, allow_negative_weights=True, normalize=False)
    space = SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add")})
    recipe = space.decode({"weight": 0.0})
    assert recipe.models[0].parameters["weight"] == -0.5 and recipe.parameters["normalize"] is False
