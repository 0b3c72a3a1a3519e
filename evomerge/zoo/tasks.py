"""The zoo's lm-eval task directory: YAML task configs over JSONL splits.

For every evaluated skill four tasks are written:

- ``zoo_<skill>``: greedy generation scored by exact match (what a user would run);
- ``zoo_<skill>_ll``: one loglikelihood request per example whose ``acc`` is 1 iff the
  answer and its newline are the greedy continuation -- the same verdict as generation,
  for one forward pass (use this form as fitness);
- ``..._heldout`` variants of both on the held-out split, which a search never sees.

``data_files`` paths are relative to the task directory. lm-eval itself resolves them
against the current directory, so run it from the task directory (evomerge's own fitness
layer resolves them against the YAML's folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evomerge.zoo.skills import SKILLS, Example

FIT, HELDOUT = "fit", "heldout"


def task_names(skill: str) -> dict[str, str]:
    """The lm-eval task names of one skill, by form and split."""
    return {
        "generate_fit": f"zoo_{skill}",
        "generate_heldout": f"zoo_{skill}_heldout",
        "ll_fit": f"zoo_{skill}_ll",
        "ll_heldout": f"zoo_{skill}_ll_heldout",
    }


def _base_config(skill: str, split_files: dict[str, str]) -> dict:
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": split_files},
        "test_split": FIT,
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",
        "metadata": {"version": 1.0, "description": f"evomerge toy zoo: {SKILLS[skill].description}"},
    }


def write_task_dir(out: Path, splits: dict[str, dict[str, list[Example]]]) -> None:
    """Write ``out/data/<skill>_<split>.jsonl`` and the task YAMLs for ``splits[skill][split]``."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for skill, by_split in splits.items():
        files = {}
        for split, examples in by_split.items():
            rel = f"data/{skill}_{split}.jsonl"
            files[split] = rel
            with open(out / rel, "w") as f:
                for ex in examples:
                    f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
        names = task_names(skill)
        generate = {
            "task": names["generate_fit"],
            **_base_config(skill, files),
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
        loglikelihood = {
            "task": names["ll_fit"],
            **_base_config(skill, files),
            "output_type": "loglikelihood",
            # The newline is part of the target: it makes is_greedy equal stop-at-newline decoding.
            "doc_to_target": "{{answer}}\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        for cfg, fit_name, heldout_name in [
            (generate, names["generate_fit"], names["generate_heldout"]),
            (loglikelihood, names["ll_fit"], names["ll_heldout"]),
        ]:
            _dump(out / f"{fit_name}.yaml", cfg)
            _dump(
                out / f"{heldout_name}.yaml",
                {"include": f"{fit_name}.yaml", "task": heldout_name, "test_split": HELDOUT},
            )


class _Dumper(yaml.SafeDumper):
    """Writes strings that hold a newline double-quoted (``"{{answer}}\\n"``), not folded."""


_Dumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None),
)


def _dump(path: Path, cfg: dict) -> None:
    path.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def read_split(task_dir: Path, skill: str, split: str) -> list[Example]:
    """The examples of one skill's split, as written by :func:`write_task_dir`."""
    path = Path(task_dir) / "data" / f"{skill}_{split}.jsonl"
    with open(path) as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]
