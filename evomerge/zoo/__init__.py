"""The toy model zoo: a tiny Llama base, experts fine-tuned from it on synthetic skills,
and their lm-eval tasks. Synthetic by design: it exists so that the demo, the tests and the
benchmarks can run offline on two CPUs, with merges that behave as they do for real models.

>>> zoo = load_zoo()                 # the prebuilt zoo shipped with the package
>>> zoo.model("base"), zoo.expert_set("mergeable"), zoo.tasks
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evomerge.errors import EvomergeError

PREBUILT = Path(__file__).parent / "prebuilt"


@dataclass(frozen=True)
class Zoo:
    root: Path

    @cached_property
    def manifest(self) -> dict:
        path = self.root / "zoo.json"
        if not path.is_file():
            raise EvomergeError(f"{self.root}: not a zoo directory (no zoo.json)")
        return json.loads(path.read_text())

    @property
    def tasks(self) -> Path:
        return self.root / self.manifest["tasks"]

    @property
    def skills(self) -> list[str]:
        return list(self.manifest["skills"])

    @property
    def model_names(self) -> list[str]:
        return list(self.manifest["models"])

    def model(self, name: str) -> Path:
        if name not in self.manifest["models"]:
            raise EvomergeError(f"{self.root}: no zoo model {name!r}; have {', '.join(self.model_names)}")
        return self.root / name

    def expert_set(self, name: str) -> list[str]:
        sets = self.manifest["sets"]
        if name not in sets:
            raise EvomergeError(f"{self.root}: no expert set {name!r}; have {', '.join(sets)}")
        return list(sets[name])


def load_zoo(path: str | Path | None = None) -> Zoo:
    """Open a zoo directory (the prebuilt one when ``path`` is None)."""
    zoo = Zoo(Path(path) if path else PREBUILT)
    _ = zoo.manifest  # fail early, with the directory named
    return zoo
