import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import CheckpointReader, CheckpointWriter
from evomerge.errors import EvomergeError
from evomerge.merge import ModelSink, merge, merge_into_model, merge_to_state_dict, plan_merge
from evomerge.methods import merge_tensors
from evomerge.recipe import MergeRecipe
from evomerge.zoo.table import load_state


def ties_recipe(zoo, **extra):
    data = {
        "merge_method": "dare_ties",
        "base_model": str(zoo.model("base")),
        "models": [
            {"model": str(zoo.model("add")), "parameters": {"weight": [0.2, 1.0], "density": 0.7}},
            {"model": str(zoo.model("rev")), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "evomerge": {"seed": 11},
    }
    data.update(extra)
    return MergeRecipe.parse(data)


def test_merged_tensors_are_the_method_applied_with_resolved_parameters(quick_zoo):
    r = MergeRecipe.parse(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(quick_zoo.model("base")),
            "models": [
                {"model": str(quick_zoo.model("add")), "parameters": {"weight": [0.0, 1.0]}},
                {"model": str(quick_zoo.model("rev")), "parameters": {"weight": [{"filter": "mlp", "value": 2.0},
                                                                                 {"value": 0.5}]}},
            ],
        }
    )  # fmt: skip
    out = merge_to_state_dict(r)
    s = {n: load_state(quick_zoo.model(n)) for n in ["base", "add", "rev"]}
    name = "model.layers.1.mlp.up_proj.weight"  # last of 2 layers: add weight 1.0, rev 2.0 (mlp)
    expected = (
        s["base"][name] + 1.0 * (s["add"][name] - s["base"][name]) + 2.0 * (s["rev"][name] - s["base"][name])
    )
    assert torch.allclose(out[name], expected, atol=1e-6)
    name = "model.layers.0.self_attn.q_proj.weight"  # first layer: add 0.0, rev 0.5
    expected = s["base"][name] + 0.5 * (s["rev"][name] - s["base"][name])
    assert torch.allclose(out[name], expected, atol=1e-6)
    name = "model.embed_tokens.weight"  # outside the stack: first gradient value
    expected = s["base"][name] + 0.5 * (s["rev"][name] - s["base"][name])
    assert torch.allclose(out[name], expected, atol=1e-6)


def test_stochastic_merges_reproduce_bit_for_bit_and_depend_on_the_seed(quick_zoo):
    one, two = merge_to_state_dict(ties_recipe(quick_zoo)), merge_to_state_dict(ties_recipe(quick_zoo))
    assert all(torch.equal(one[n], two[n]) for n in one)
    other = merge_to_state_dict(ties_recipe(quick_zoo, evomerge={"seed": 12}))
    assert any(not torch.equal(one[n], other[n]) for n in one)


@pytest.mark.slow
def test_merge_cli_writes_a_checkpoint_transformers_loads_offline(zoo, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ties_recipe(zoo, dtype="float32", out_dtype="bfloat16").to_yaml())
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe), str(out), "--shard-size", "1MB"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 39
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.decode(tokenizer.encode("add:1+2=")) == "add:1+2="
    expected = merge_to_state_dict(ties_recipe(zoo, dtype="float32", out_dtype="bfloat16"))
    reader = CheckpointReader(out)
    assert all(torch.equal(reader.get(n), expected[n]) for n in expected)
    # written through the page cache instead of O_DIRECT: the same bytes
    plain = tmp_path / "plain"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge",
            "merge",
            str(recipe),
            str(plain),
            "--shard-size",
            "1MB",
            "--no-direct-io",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in plain.glob("*.safetensors")) and len(shards) > 1
    assert all((out / s).read_bytes() == (plain / s).read_bytes() for s in shards)


def test_merge_into_a_resident_model_updates_parameters_in_place(quick_zoo):
    model = AutoModelForCausalLM.from_pretrained(quick_zoo.model("base"))
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    recipe = ties_recipe(quick_zoo)
    readers = {}
    merge_into_model(recipe, model, readers=readers)
    expected = merge_to_state_dict(recipe)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n]  # no reallocation
        assert torch.equal(p.data, expected[n])
    opened = dict(readers)
    merge_into_model(recipe, model, readers=readers)  # checkpoints stay open across merges
    assert readers == opened and all(readers[k] is opened[k] for k in opened)


@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "model_stock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_into_a_model_writes_elementwise_results_straight_into_its_parameters(
    quick_zoo, method, dtype, monkeypatch
):
    # where the result's dtype is the parameter's, an elementwise method (linear, TIES, SLERP)
    # writes into the parameter itself; otherwise (model_stock, or a model held in another
    # dtype) the result is made apart and copied in. Either way: the tensors of a plain merge.
    experts = [str(quick_zoo.model(m)) for m in ("add", "rev")]
    data = {"merge_method": method, "base_model": str(quick_zoo.model("base"))}
    if method == "slerp":
        data.update(models=[{"model": experts[0]}], parameters={"t": 0.3})
    elif method == "model_stock":
        data.update(models=[{"model": m} for m in experts])
    else:
        params = {"weight": 0.6, "density": 0.5} if method == "ties" else {"weight": 0.6}
        data.update(models=[{"model": m, "parameters": params} for m in experts])
        if method == "linear":  # (a weighted average of the experts alone)
            del data["base_model"]
    recipe = MergeRecipe.parse(data)
    model = AutoModelForCausalLM.from_pretrained(quick_zoo.model("base"), dtype=dtype)
    received = []
    call = ModelSink.__call__

    def record(self, name, tensor):
        received.append(tensor is self.targets[name])
        call(self, name, tensor)

    monkeypatch.setattr(ModelSink, "__call__", record)
    merge_into_model(recipe, model)
    expected = merge_to_state_dict(recipe)
    for n, p in model.named_parameters():
        assert torch.equal(p.data, expected[n].to(dtype)), n
    stored = next(iter(expected.values())).dtype
    assert all(received) == (method != "model_stock" and dtype == stored)
    assert any(received) == (method != "model_stock" and dtype == stored)


def test_tokenizer_source_picks_which_model_the_tokenizer_comes_from(quick_zoo, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text("{}")
    r = ties_recipe(quick_zoo, tokenizer_source=str(quick_zoo.model("rev")))
    assert plan_merge(r).tokenizer_source == quick_zoo.model("rev")
    with pytest.raises(
        EvomergeError, match="tokenizer_source: 'elsewhere' is not one of the recipe's models"
    ):
        plan_merge(ties_recipe(quick_zoo, tokenizer_source="elsewhere"))


# -- bad input: one clear error, nothing written ---------------------------------------------------


def _copy_with(src, dst, change):
    state = load_state(src)
    change(state)
    with CheckpointWriter(dst, metadata_from=src) as w:
        for n, t in state.items():
            w.add(n, t)
    return dst


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}), "tensor lm_head.weight: shapes differ"),
        (lambda s: s.pop("model.norm.weight"), "tensor 'model.norm.weight' is missing"),
    ],
)
def test_mismatched_or_missing_tensors_fail_before_any_output(quick_zoo, tmp_path, change, message):
    broken = _copy_with(quick_zoo.model("add"), tmp_path / "broken", change)
    r = ties_recipe(quick_zoo)
    data = r.to_dict()
    data["models"][0]["model"] = str(broken)
    with pytest.raises(EvomergeError, match=message):
        merge(MergeRecipe.parse(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_architecture_is_refused(quick_zoo, tmp_path):
    other = _copy_with(quick_zoo.model("base"), tmp_path / "gpt", lambda s: None)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    data = ties_recipe(quick_zoo).to_dict()
    data["base_model"] = str(other)
    with pytest.raises(EvomergeError, match="models of different architectures cannot be merged"):
        plan_merge(MergeRecipe.parse(data))


def test_wrong_number_of_models_and_missing_models_are_clear_errors(quick_zoo, tmp_path):
    data = {
        "merge_method": "slerp",
        "base_model": str(quick_zoo.model("base")),
        "models": [{"model": str(quick_zoo.model(n))} for n in ["add", "rev"]],
        "parameters": {"t": 0.5},
    }
    with pytest.raises(EvomergeError, match="slerp takes exactly 1 model"):
        plan_merge(MergeRecipe.parse(data))
    data["models"] = [{"model": str(tmp_path / "nowhere")}]
    with pytest.raises(EvomergeError, match="nowhere'?: no such directory"):
        plan_merge(MergeRecipe.parse(data))


def test_della_bounds_are_checked_when_planning_naming_the_model(quick_zoo, tmp_path):
    add = str(quick_zoo.model("add"))
    data = {
        "merge_method": "della",
        "base_model": str(quick_zoo.model("base")),
        "models": [{"model": add, "parameters": {"weight": 1.0, "density": [0.5, 0.1]}}],
    }
    with pytest.raises(
        EvomergeError, match=rf"tensor model\.layers\.1\..*: model {re.escape(add)}: density 0.1"
    ):
        merge(MergeRecipe.parse(data), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_models_of_different_depths_are_refused_before_anything_is_written(quick_zoo, tmp_path):
    add = CheckpointReader(quick_zoo.model("add"))
    n = add.num_layers
    deeper = tmp_path / "deeper"  # add with its last layer repeated
    with CheckpointWriter(
        deeper, metadata_from=quick_zoo.model("add"), config_updates={"num_hidden_layers": n + 1}
    ) as w:
        for name in add.names:
            w.add(name, add.get(name))
        for name in add.names:
            if f"layers.{n - 1}." in name:
                w.add(name.replace(f"layers.{n - 1}.", f"layers.{n}."), add.get(name))
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(quick_zoo.model("base")),
        "models": [{"model": str(deeper), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(EvomergeError, match=rf"model .*deeper has {n + 1} layers and .*base has {n}"):
        merge(MergeRecipe.parse(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a resident model the recipe's output does not fit is refused before any parameter changes
    model = AutoModelForCausalLM.from_pretrained(quick_zoo.model("base"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stack = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(quick_zoo.model("add")), "layer_range": [0, n]}]},
                   {"sources": [{"model": str(quick_zoo.model("add")), "layer_range": [n - 1, n]}]}],
    }  # fmt: skip
    with pytest.raises(EvomergeError, match=f"no parameter 'model.layers.{n}."):
        merge_into_model(MergeRecipe.parse(stack), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_refuses_a_device_it_cannot_use_in_one_line(quick_zoo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ties_recipe(quick_zoo).to_dict()))
    for device, why in [("meta", "not supported"), ("tpu", "not a device"), ("cuda:x", "not a device")]:
        run = subprocess.run(
            [sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "o"), "--device", device],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
        assert f"--device {device}: {why}" in run.stderr
    assert not (tmp_path / "o").exists()


def test_a_failure_during_the_merge_leaves_no_output(quick_zoo, tmp_path, monkeypatch):
    calls = []

    def failing(name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk full")

    monkeypatch.setattr(CheckpointWriter, "add", lambda self, n, t: failing(n, t))
    with pytest.raises(RuntimeError, match="disk full"):
        merge(ties_recipe(quick_zoo), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_recipes_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": "x"}], "paramters": {}}))
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: {recipe}: paramters: unknown key; did you mean 'parameters'?"


def test_cli_errors_naming_models_by_path_print_the_path(quick_zoo, tmp_path):
    # the error names the model as models[/abs/path]: printed as text, not as console markup
    add = str(quick_zoo.model("add"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(quick_zoo.model("base")),
                "models": [{"model": add, "parameters": {"weight": 1.0, "densty": 0.5}}],
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"models[{add}]" in lines[0] and "densty" in lines[0], run.stderr
    assert not (tmp_path / "o").exists()


def test_merge_tensors_matches_the_engine_for_one_tensor(quick_zoo):
    r = ties_recipe(quick_zoo)
    s = {n: load_state(quick_zoo.model(n)) for n in ["base", "add", "rev"]}
    name = "lm_head.weight"
    out = merge_to_state_dict(r)[name]
    from evomerge.merge import tensor_seed

    direct = merge_tensors(
        "dare_ties", [s["add"][name], s["rev"][name]], s["base"][name], weight=[0.2, 0.5], density=[0.7, 0.5],
        seed=tensor_seed(11, name),
    )  # fmt: skip
    assert torch.equal(out, direct)


RECIPES = [
    p
    for p in sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
    if "merge_method:" in p.read_text()
]


@pytest.mark.parametrize("example", RECIPES, ids=str)
def test_shipped_example_recipes_merge_and_mergekit_accepts_them(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve from the recipe's folder
    state = merge_to_state_dict(example)
    assert len(state) == 39
    import mergekit.config as mergekit_config

    mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(example.read_text()))


def test_keeping_freed_memory_is_applied_on_glibc_and_idempotent():
    import platform
    import sys

    from evomerge.allocator import keep_freed_memory

    applied = keep_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied is True
    assert keep_freed_memory() is applied
