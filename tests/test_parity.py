"""evomerge and mergekit produce the same tensors for the same recipe.

mergekit (a dev dependency) is the reference: its in-memory `merge_state_dicts` for the
method math, and its YAML pipeline (`run_merge`, what `mergekit-yaml` runs) for gradients,
filters and slices. Stochastic methods (DARE, DELLA) draw their masks differently, so they
are compared where they are deterministic (density 1).
"""

import pytest
import torch
import yaml

# mergekit is part of the test set-up (`make test`): missing, these tests fail rather than skip
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.options import MergeOptions

from evomerge.merge import merge_to_state_dict
from evomerge.methods import merge_tensors
from evomerge.recipe import MergeRecipe, Provenance
from evomerge.zoo.table import load_state

ATOL = 2e-6


@pytest.fixture(scope="module")
def states(quick_zoo):
    return {n: load_state(quick_zoo.model(n)) for n in ["base", "add", "rev", "add_noreplay"]}


# (method, models, base, per-model parameters, global parameters)
CASES = [
    ("linear", ["add", "rev"], None, {"weight": [0.3, 0.7]}, {}),
    ("linear", ["add", "rev", "base"], None, {"weight": [0.3, 0.7, 0.5]}, {"normalize": False}),
    ("task_arithmetic", ["add", "rev"], "base", {"weight": [0.7, 0.5]}, {"lambda": 0.8}),
    ("ties", ["add", "rev"], "base", {"weight": [0.7, 0.5], "density": [0.5, 0.3]}, {}),
    ("ties", ["add", "rev", "add_noreplay"], "base", {"weight": [1, 1, 1], "density": [0.2, 0.9, 0.5]},
     {"normalize": False, "lambda": 1.3}),
    ("ties", ["add", "rev"], "base", {"weight": [0.7, 0.5], "density": [0.5, 0.3]}, {"rescale": True}),
    ("breadcrumbs", ["add", "rev"], "base", {"weight": [1, 1], "density": [0.6, 0.4], "gamma": [0.1, 0.05]}, {}),
    ("breadcrumbs_ties", ["add", "rev"], "base", {"weight": [1, 0.5], "density": [0.6, 0.4], "gamma": [0.1, 0.01]},
     {}),
    ("dare_ties", ["add", "rev"], "base", {"weight": [0.7, 0.5], "density": [1.0, 1.0]}, {}),
    ("dare_linear", ["add", "rev"], "base", {"weight": [0.7, 0.5], "density": [1.0, 1.0]}, {}),
    ("della", ["add", "rev"], "base", {"weight": [0.7, 0.5], "density": [1.0, 1.0]}, {}),
    ("slerp", ["add"], "base", {}, {"t": 0.3}),
    ("nuslerp", ["add", "rev"], None, {"weight": [0.3, 0.7]}, {}),
    ("nuslerp", ["add", "rev"], "base", {"weight": [0.6, 0.4]}, {}),
    ("nuslerp", ["add", "rev"], None, {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False}),
    ("nuslerp", ["add", "rev"], None, {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", ["add", "rev", "add_noreplay"], None, {"weight": [0.2, 0.5, 0.3]}, {}),
    ("multislerp", ["add", "rev"], "base", {"weight": [1.0, 2.0]}, {}),
    ("model_stock", ["add", "rev"], "base", {}, {}),
    ("model_stock", ["add", "rev", "add_noreplay"], "base", {}, {"filter_wise": True}),
    ("karcher", ["base", "add", "rev"], None, {}, {}),
    ("sce", ["add", "rev"], "base", {}, {}),
    ("sce", ["add", "rev", "add_noreplay"], "base", {}, {"select_topk": 0.4}),
]  # fmt: skip


@pytest.mark.parametrize("method,models,base,per_model,shared", CASES, ids=lambda c: str(c)[:40])
def test_methods_match_mergekit_merge_state_dicts(states, method, models, base, per_model, shared):
    inputs = {m: states[m] for m in models + ([base] if base else [])}
    mk_params = dict(shared)
    for name, values in per_model.items():
        mk_params[name] = dict(zip(models, values, strict=True))
    theirs = merge_state_dicts(inputs, method, parameters=mk_params, base=base)
    for name, expected in theirs.items():
        ours = merge_tensors(
            method,
            [states[m][name] for m in models],
            states[base][name] if base else None,
            **per_model,
            **shared,
        )
        assert torch.allclose(ours, expected.to(ours.dtype), atol=ATOL, rtol=1e-5), name


def _mergekit_yaml(recipe: dict, out):
    run_merge(
        MergeConfiguration.model_validate(recipe),
        str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    return load_state(out)


def _recipes(zoo):
    base, add, rev, forgot = (str(zoo.model(n)) for n in ["base", "add", "rev", "add_noreplay"])
    return {
        "gradients_and_filters": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": add, "parameters": {
                    "weight": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.4},
                               {"value": [1.0, 0.2, 0.7]}],
                    "density": [0.3, 0.8]}},
                {"model": rev, "parameters": {"weight": 0.6, "density": [{"filter": "up_proj", "value": 0.2},
                                                                        {"value": 0.7}]}},
            ],
            "parameters": {"normalize": True, "lambda": [1.2, 0.8]},
            "dtype": "float32",
        },
        "top_level_fallback": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": add}, {"model": rev, "parameters": {"weight": 0.25}}],
            "parameters": {"weight": [0.5, 1.0]},
        },
        "slices": {
            "merge_method": "slerp",
            "base_model": base,
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 1]}, {"model": add, "layer_range": [0, 1]}],
                 "parameters": {"t": 0.2}},
                {"sources": [{"model": base, "layer_range": [1, 2]}, {"model": rev, "layer_range": [1, 2]}]},
            ],
            "parameters": {"t": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]},
        },
        # per-model filters match the tensor's name in its own model (layer 1 here, written as
        # the output's layer 0), shared ones the output's name, as in mergekit
        "slice_filters_by_input_name": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "slices": [
                {"sources": [{"model": base, "layer_range": [1, 2]},
                             {"model": add, "layer_range": [1, 2], "parameters": {
                                 "weight": [{"filter": "layers.1.", "value": 1.0}, {"value": 0.0}]}}]},
                {"sources": [{"model": base, "layer_range": [0, 1]},
                             {"model": add, "layer_range": [0, 1], "parameters": {
                                 "weight": [{"filter": "layers.1.", "value": 0.5}, {"value": 0.25}]}}]},
            ],
            "parameters": {"lambda": [{"filter": "layers.1.", "value": 2.0}, {"value": 1.0}]},
        },
        "passthrough_stack": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": add, "layer_range": [0, 2]}]},
                {"sources": [{"model": forgot, "layer_range": [1, 2]}]},
            ],
        },
    }  # fmt: skip


RECIPE_CASES = [
    "gradients_and_filters",
    "top_level_fallback",
    "slices",
    "slice_filters_by_input_name",
    "passthrough_stack",
]


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_recipes_merge_to_the_same_tensors_as_mergekit(quick_zoo, tmp_path, case):
    recipe = _recipes(quick_zoo)[case]
    theirs = _mergekit_yaml(recipe, tmp_path / "mk")
    ours = merge_to_state_dict(MergeRecipe.parse(recipe))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=ATOL), name


def _stochastic_recipe(zoo) -> dict:
    base, add, rev = (str(zoo.model(n)) for n in ["base", "add", "rev"])
    return {
        "merge_method": "della",
        "base_model": base,
        "models": [{"model": add, "parameters": {"weight": [0.4, 1.0], "density": 0.6, "epsilon": 0.2}},
                   {"model": rev, "parameters": {"weight": 0.7, "density": [0.3, 0.7], "epsilon": 0.1}}],
        "parameters": {"lambda": 1.1},
    }  # fmt: skip


@pytest.mark.parametrize("case", [*RECIPE_CASES, "stochastic"])
def test_every_recipe_evomerge_writes_is_accepted_by_mergekit_unchanged(quick_zoo, tmp_path, case):
    recipe = _stochastic_recipe(quick_zoo) if case == "stochastic" else _recipes(quick_zoo)[case]
    written = MergeRecipe.parse(recipe).model_copy(update={"evomerge": Provenance(seed=3, found_by="test")})
    data = yaml.safe_load(written.to_yaml())
    assert data["evomerge"]["seed"] == 3
    # mergekit validates, plans and runs the written file as it is, to the same set of tensors
    theirs = _mergekit_yaml(data, tmp_path / "mk")
    assert sorted(theirs) == sorted(merge_to_state_dict(written))


def test_a_staged_recipe_merges_to_the_same_tensors_as_mergekit_multi(quick_zoo, tmp_path):
    """Per-layer-group methods: a stage per method, then a passthrough taking each group's
    layers from its stage (embeddings from the first slice's stage, head from the last's)."""
    import subprocess
    import sys
    from pathlib import Path

    from evomerge.recipe import StagedRecipe, load_recipe

    base, add, rev = (str(quick_zoo.model(n)) for n in ["base", "add", "rev"])
    experts = [{"model": add, "parameters": {"weight": [0.9, 0.4], "density": 0.5}},
               {"model": rev, "parameters": {"weight": 0.7, "density": [0.3, 0.8]}}]  # fmt: skip
    text = yaml.safe_dump_all(
        [
            {"name": "stage_ties", "merge_method": "ties", "base_model": base, "models": experts},
            {"name": "stage_ta", "merge_method": "task_arithmetic", "base_model": base,
             "models": [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in experts]},
            {"merge_method": "passthrough", "slices": [
                {"sources": [{"model": "stage_ta", "layer_range": [0, 1]}]},
                {"sources": [{"model": "stage_ties", "layer_range": [1, 2]}]},
            ]},
        ],
        sort_keys=False,
    )  # fmt: skip
    path = tmp_path / "staged.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert isinstance(recipe, StagedRecipe) and recipe.model_names() == [base, add, rev]
    assert load_recipe_roundtrip(recipe, tmp_path) == recipe.digest()
    mk = Path(sys.executable).parent / "mergekit-multi"
    done = subprocess.run(
        [str(mk), str(path), "--intermediate-dir", str(tmp_path / "stages"), "--out-path", str(tmp_path / "mk"),
         "--no-copy-tokenizer"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = load_state(tmp_path / "mk")
    ours = merge_to_state_dict(recipe)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=ATOL), name
    ta_only = merge_to_state_dict(recipe.stages["stage_ta"])
    ties_only = merge_to_state_dict(recipe.stages["stage_ties"])
    assert torch.equal(ours["model.embed_tokens.weight"], ta_only["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], ties_only["lm_head.weight"])
    assert torch.equal(
        ours["model.layers.0.mlp.up_proj.weight"], ta_only["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        ours["model.layers.1.mlp.up_proj.weight"], ties_only["model.layers.1.mlp.up_proj.weight"]
    )


def load_recipe_roundtrip(recipe, tmp_path):
    from evomerge.recipe import load_recipe

    recipe.save(tmp_path / "again.yaml")
    return load_recipe(tmp_path / "again.yaml").digest()
