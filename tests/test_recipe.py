import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.methods import get_method
from evomerge.recipe import MergeRecipe, evaluate, resolve

WEIGHT = get_method("ties").param("weight")
NORMALIZE = get_method("ties").param("normalize")


def recipe(**kw):
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
    }
    data.update(kw)
    return data


@pytest.mark.parametrize(
    "gradient,t,expected",
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 1 / 3, 1 / 3),
        ([0.0, 1.0, 0.0], 0.25, 0.5),  # s = 0.5: halfway between v0 and v1
        ([0.0, 1.0, 0.0], 0.75, 0.5),
        ([1.0, 0.2, 0.7], 2 / 3, 0.2 + (0.7 - 0.2) / 3),  # layer 2 of 4: s = 4/3
        ([0.5], 0.8, 0.5),
    ],
)
def test_gradients_interpolate_linearly_across_depth(gradient, t, expected):
    assert evaluate(gradient, "model.layers.0.mlp.up_proj.weight", t, WEIGHT, "w") == pytest.approx(expected)


def test_non_numeric_gradients_pick_a_step():
    assert evaluate([True, False], "x", 0.4, NORMALIZE, "n") is True
    assert evaluate([True, False], "x", 1.0, NORMALIZE, "n") is False


def test_the_first_matching_filter_wins_and_an_unfiltered_entry_catches_the_rest():
    r = MergeRecipe.parse(
        recipe(
            parameters={
                "weight": [
                    {"filter": "self_attn", "value": 0.1},
                    {"filter": "attn", "value": 0.2},
                    {"value": [0.0, 1.0]},
                ]
            }
        )
    )
    setting = r.parameters["weight"]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0, WEIGHT, "w") == 0.1
    assert evaluate(setting, "transformer.h.1.attn.c_attn.weight", 0, WEIGHT, "w") == 0.2
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5, WEIGHT, "w") == 0.5


def test_no_matching_filter_falls_through_to_the_next_level():
    specific = {"weight": [{"filter": "mlp", "value": 0.3}]}
    general = {"weight": 0.9}
    assert resolve(WEIGHT, [specific, general], "model.layers.0.mlp.x", 0, "w") == 0.3
    assert resolve(WEIGHT, [specific, general], "model.layers.0.self_attn.x", 0, "w") == 0.9


def test_model_parameters_take_precedence_over_top_level_and_defaults_fill_the_rest():
    density = get_method("ties").param("density")
    assert resolve(WEIGHT, [{"weight": 0.2}, {"weight": 0.7}], "t", 0, "w") == 0.2
    assert resolve(WEIGHT, [None, {"weight": 0.7}], "t", 0, "w") == 0.7
    assert resolve(density, [None, None], "t", 0, "w") == 1.0
    with pytest.raises(EvomergeError, match="missing required parameter 'weight'"):
        resolve(WEIGHT, [None, {}], "t", 0, "model a")


def test_recipe_round_trips_through_yaml():
    r = MergeRecipe.parse(
        recipe(parameters={"density": [0.1, 0.5], "normalize": False}, dtype="bfloat16", evomerge={"seed": 4})
    )
    again = MergeRecipe.parse(yaml.safe_load(r.to_yaml()))
    assert again == r and again.digest() == r.digest()
    assert "density: [0.1, 0.5]" in r.to_yaml()  # gradients in flow style, as mergekit writes them


def test_digest_changes_with_meaning():
    a = MergeRecipe.parse(recipe())
    b = MergeRecipe.parse(recipe(parameters={"lambda": 0.5}))
    assert a.digest() != b.digest()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"merge_method": "tiess"}, "unknown merge_method 'tiess'; choose one of"),
        ({"dtype": "fp8"}, "dtype: must be one of float32, float16, bfloat16, float64"),
        ({"parameters": {"t": 0.5}}, "parameters: unknown parameter 't' for ties; allowed: density,"),
        ({"models": None}, "give exactly one of `models` or `slices`"),
        ({"modles": []}, "modles: unknown key"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}], "models": None}, "layer_range"),
    ],
)
def test_validation_errors_name_the_key_and_the_allowed_values(change, message):
    data = recipe()
    data.update(change)
    if data.get("models") is None:
        data.pop("models")
    with pytest.raises(EvomergeError, match=message.replace("(", r"\(").replace("`", ".")):
        MergeRecipe.parse(data, where="r.yaml")


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(EvomergeError, match="bad.yaml: invalid YAML"):
        MergeRecipe.load(bad)
    with pytest.raises(EvomergeError, match="missing.yaml: cannot read recipe"):
        MergeRecipe.load(tmp_path / "missing.yaml")
    bad.write_text("- just a list")
    with pytest.raises(EvomergeError, match="bad.yaml: a recipe must be a mapping"):
        MergeRecipe.load(bad)


def test_model_names_lists_each_model_once_base_first():
    r = MergeRecipe.parse(recipe(models=[{"model": "a"}, {"model": "b"}, {"model": "c"}]))
    assert r.model_names() == ["b", "a", "c"]
