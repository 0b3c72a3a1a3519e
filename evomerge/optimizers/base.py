"""One ask/tell interface over every optimizer backend. Objectives are maximized.

State is derived, not pickled: every optimizer here is deterministic given its seed and the
sequence of asks and tells it has seen, so ``state()`` is that sequence (JSON) and
``restore()`` rebuilds the optimizer and replays it. No unpickling of files from a run
directory, and a state that reads as what happened.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from evomerge.errors import EvomergeError
from evomerge.space import Genome, SearchSpace


@dataclass(frozen=True)
class Proposal:
    id: int
    genome: Genome


class Optimizer(ABC):
    """``ask(n)`` proposes up to n genomes; ``tell(id, objectives)`` reports one (None: the
    candidate failed and counts as the worst score); ``state()``/``restore()`` for resume.

    Proposals may be told in any order and while others are out (asynchronous workers);
    ``outstanding`` holds those asked and not yet told. ``on_event``, when set, receives each
    ask and tell as it happens (the search appends them to the run's journal)."""

    name: str

    def __init__(self, space: SearchSpace, seed: int, n_objectives: int = 1, **options):
        self.space, self.seed, self.n_objectives, self.options = space, seed, n_objectives, options
        self._events: list[list] = []  # ["ask", n] and ["tell", id, objectives], in order
        self.outstanding: dict[int, Proposal] = {}
        self.on_event: Callable[[list], None] | None = None

    def ask(self, n: int = 1) -> list[Proposal]:
        proposals = self._ask(n)
        self.outstanding.update((p.id, p) for p in proposals)
        self._event(["ask", n])
        return proposals

    def tell(self, proposal_id: int, objectives: list[float] | None) -> None:
        if proposal_id not in self.outstanding:
            raise EvomergeError(f"proposal {proposal_id} was never asked for, or was told already")
        self._tell(proposal_id, objectives)
        del self.outstanding[proposal_id]
        self._event(["tell", proposal_id, None if objectives is None else [float(v) for v in objectives]])

    def _event(self, event: list) -> None:
        self._events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    @abstractmethod
    def _ask(self, n: int) -> list[Proposal]: ...

    @abstractmethod
    def _tell(self, proposal_id: int, objectives: list[float] | None) -> None: ...

    def state(self) -> bytes:
        return json.dumps(
            {
                "seed": self.seed,
                "n_objectives": self.n_objectives,
                "options": self.options,
                "events": self._events,
            }
        ).encode()

    def restore(self, state: bytes) -> None:
        """Rebuild from ``state()``: same seed and options, the same asks and tells replayed."""
        try:
            data = json.loads(state)
            events = data["events"]
            type(self).__init__(self, self.space, data["seed"], data["n_objectives"], **data["options"])
        except (ValueError, KeyError, TypeError) as e:
            raise EvomergeError(f"optimizer state is not readable ({e})") from None
        self.replay(events)

    def replay(self, events: list[list]) -> None:
        """Apply recorded asks and tells in order (a fresh optimizer with the same seed and
        options then stands exactly where the recorded one stood)."""
        for event in events:
            if event[0] == "ask":
                self.ask(event[1])
            elif event[0] == "tell":
                self.tell(event[1], event[2])
            else:
                raise EvomergeError(f"optimizer history: unknown event {event!r}")
