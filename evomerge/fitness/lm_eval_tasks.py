"""lm-eval tasks scored on a resident model: tasks and requests built once, forward passes per call.

``evaluate()`` of lm-eval rebuilds every request on every call; a search scores thousands of
candidates on the same examples, so here the tasks' requests are built once, through lm-eval's
public Task and LM interfaces (``build_all_requests``, ``LM.loglikelihood`` /
``generate_until``, ``apply_filters``, ``process_results``, ``aggregation``), and each call
only re-runs the model. The numbers are the ones ``lm_eval.simple_evaluate`` reports for the
same examples (a test checks it).

>>> scorer = TaskScorer(model, tokenizer, spec)     # once per worker
>>> scorer()                                        # per candidate, after changing the weights
{'zoo_add_ll': {'acc,none': 0.69}, ...}
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import defaultdict
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec, TaskSpec

log = logging.getLogger(__name__)


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML, whose `!function` tags name Python code we do not run here."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_dirs(dirs: list[Path]) -> None:
    """Fail on the first unreadable task YAML, naming it (lm-eval would skip it silently)."""
    for d in dirs:
        if not Path(d).is_dir():
            raise EvomergeError(f"task_dirs: {d} is not a directory")
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                data = yaml.load(path.read_text(), Loader=_TolerantLoader)  # noqa: S506 (safe subclass)
            except yaml.YAMLError as e:
                raise EvomergeError(f"{path}: invalid task YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise EvomergeError(f"{path}: a task YAML must be a mapping")


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load_tasks(spec: FitnessSpec) -> dict[str, object]:
    """lm-eval Task objects by task label. Relative ``data_files`` in a YAML resolve against
    that YAML's folder (lm-eval alone would resolve them against the current directory)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    dirs = [Path(d).resolve() for d in spec.task_dirs]
    check_task_dirs(dirs)
    local = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False) if dirs else None
    names = {t.name for t in spec.tasks}
    builtin = sorted(n for n in names if local is None or n not in local.all_tasks)
    manager = local
    if builtin:  # only then pay for indexing lm-eval's ~14,000 built-in tasks
        manager = TaskManager(include_path=[str(d) for d in dirs] or None, include_defaults=True)
        unknown = [n for n in builtin if n not in manager.all_tasks]
        if unknown:
            raise EvomergeError(
                f"unknown task {unknown[0]!r} (not in {', '.join(map(str, dirs)) or 'lm-eval'})"
            )
    tasks = {}
    for t in spec.tasks:
        entry = manager.task_index[t.name]
        folder = Path(entry.yaml_path).parent if entry.yaml_path else Path.cwd()
        with _cwd(folder):
            task = get_task_dict([t.name], manager)[t.name]
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            if t.split:
                task.set_config(key="test_split", value=t.split)
            _ = task.eval_docs  # load the data while in the YAML's folder
        tasks[t.label] = task
    return tasks


def subset(n_docs: int, limit: int | None, seed: int, label: str) -> list[int] | None:
    """The same seeded subset of documents for every candidate (None: all of them)."""
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(f"{seed}:{label}").sample(range(n_docs), limit))


class TaskScorer:
    """Scores a resident model on lm-eval tasks; call it after each weight change."""

    def __init__(self, model, tokenizer, spec: FitnessSpec, tasks: dict[str, object] | None = None):
        from lm_eval.models.huggingface import HFLM

        self.spec = spec
        device = next(model.parameters()).device
        kwargs = {"max_length": spec.max_length} if spec.max_length else {}
        with _quiet():
            self.lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                device=str(device),
                batch_size=spec.batch_size,
                **kwargs,
            )
        self._memoize_tokenizer()
        self.tasks = tasks if tasks is not None else load_tasks(spec)
        self.instances = {}
        for label, task in self.tasks.items():
            docs = subset(len(task.eval_docs), spec.limit, spec.seed, label)
            task.build_all_requests(samples=docs, rank=0, world_size=1)
            self.instances[label] = list(task.instances)

    def _memoize_tokenizer(self) -> None:
        """Every call sends the same strings; encoding them once saves ~15% of a call on
        small models. The memo returns copies, so a caller mutating a result is harmless."""
        encode = self.lm.tok_encode
        memo: dict = {}

        def tok_encode(string, *args, **kwargs):
            key = (string, args, tuple(sorted(kwargs.items())))
            if key not in memo:
                memo[key] = encode(string, *args, **kwargs)
            return list(memo[key])

        self.lm.tok_encode = tok_encode

    def __call__(self) -> dict[str, dict[str, float]]:
        by_type = defaultdict(list)
        for insts in self.instances.values():
            for inst in insts:
                inst.resps = []
                by_type[inst.request_type].extend([inst] * inst.repeats)
        for request_type, insts in by_type.items():
            outputs = getattr(self.lm, request_type)(insts, disable_tqdm=True)
            for inst, out in zip(insts, outputs, strict=True):
                inst.resps.append(out)
        return {label: self._metrics(self.tasks[label], insts) for label, insts in self.instances.items()}

    @staticmethod
    def _metrics(task, instances) -> dict[str, float]:
        task.apply_filters()
        by_doc = defaultdict(list)
        for inst in instances:
            by_doc[inst.doc_id].append(inst)
        raw = defaultdict(list)
        for key in instances[0].filtered_resps:
            for doc_insts in by_doc.values():
                doc_insts.sort(key=lambda i: i.idx)
                result = task.process_results(doc_insts[0].doc, [i.filtered_resps[key] for i in doc_insts])
                for metric, value in result.items():
                    raw[(metric, key)].append(value)
        aggregations = task.aggregation()
        return {f"{m},{k}": float(aggregations[m](values)) for (m, k), values in raw.items()}


@contextlib.contextmanager
def _quiet():
    """lm-eval and transformers warn about passing a model object; that is what we mean to do."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def task_specs_from_cli(items: list[str]) -> list[TaskSpec]:
    """``NAME[:METRIC[:WEIGHT]]`` strings, as `evomerge eval --task` takes them."""
    specs = []
    for item in items:
        parts = item.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise EvomergeError(f"--task {item!r}: write NAME, NAME:METRIC or NAME:METRIC:WEIGHT")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise EvomergeError(f"--task {item!r}: weight {parts[2]!r} is not a number") from None
        specs.append(
            TaskSpec(name=parts[0], metric=parts[1] if len(parts) > 1 and parts[1] else "acc", weight=weight)
        )
    return specs
