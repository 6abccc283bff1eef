"""The preference search: a person picks, from a round of candidate soups, the one they like best (or
says none beats the best so far); BoTorch's `PairwiseGP` learns a utility over the space from those
picks, and the next round's new candidates maximize the expected utility of the best option (qEUBO,
Lin et al. 2022) with the best so far in the round: what the model believes is best, weighed against
what it is unsure of. The state is plain data (JSON), so a page can keep it across a reload."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from .space import Candidate, Space

logger = logging.getLogger(__name__)


@dataclass
class Round:
    shown: list[int]  # indices into PreferenceSearch.points
    picked: int | None = None  # the index picked; None: not yet, or none better (`none`)
    none: bool = False  # "none is better than the best so far"
    best_before: int | None = None
    first_new: int = 0  # its new candidates are points[first_new:]
    added: int = 0  # comparisons its answer added

    @property
    def answered(self) -> bool:
        return self.picked is not None or self.none


@dataclass
class PreferenceSearch:
    """Rounds of `size` candidates over `space`; `pick` or `none_better` answers the last round,
    `propose` makes the next one, `undo` takes the last answer back."""

    space: Space
    seed: int = 0
    size: int = 4
    points: list[list[float]] = field(default_factory=list)
    comparisons: list[tuple[int, int]] = field(default_factory=list)  # (preferred, other)
    rounds: list[Round] = field(default_factory=list)
    best: int | None = None

    def candidate(self, index: int) -> Candidate:
        return self.space.decode(self.points[index])

    @property
    def current(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    def propose(self) -> Round:
        """The next round: the best so far (if any) and new candidates, or the last round again while
        it is unanswered."""
        if self.current is not None and not self.current.answered:
            return self.current
        fresh = self.size - (1 if self.best is not None else 0)
        if not self.comparisons:  # nothing learnt yet: the plain soup, then quasi-random points (seeded)
            new = ([] if self.points else [self.space.start()]) + self._sobol(fresh)
            new = new[:fresh]
        else:
            new = self._expected_utility(fresh)
        start = len(self.points)
        self.points += [[round(float(v), 6) for v in x] for x in new]
        shown = ([self.best] if self.best is not None else []) + list(range(start, len(self.points)))
        self.rounds.append(Round(shown, best_before=self.best, first_new=start))
        return self.rounds[-1]

    def pick(self, index: int) -> None:
        """The person liked `index` (one of the last round's) best: it beats every other one shown."""
        r = self.current
        if r is None or r.answered or index not in r.shown:
            raise ValueError("pick one of the candidates of the current round")
        r.picked = index
        new = [(index, o) for o in r.shown if o != index]
        self.comparisons += new
        r.added = len(new)
        self.best = index

    def none_better(self) -> None:
        """None of the new candidates beats the best so far (in the round, it beats them all); in a
        first round, nothing is learnt and the next round explores elsewhere."""
        r = self.current
        if r is None or r.answered:
            raise ValueError("there is no round to answer")
        r.none = True
        if self.best is not None:
            new = [(self.best, o) for o in r.shown if o != self.best]
            self.comparisons += new
            r.added = len(new)

    def undo(self) -> None:
        """Take back the last answer: its comparisons go, the best is what it was, and its round is
        open again (a round proposed after that answer is dropped)."""
        if self.current is not None and not self.current.answered and len(self.rounds) >= 2:
            dropped = self.rounds.pop()
            del self.points[dropped.first_new :]
        r = self.current
        if r is None or not r.answered:
            raise ValueError("nothing to undo")
        if r.added:
            del self.comparisons[-r.added :]
        r.picked, r.none, r.added = None, False, 0
        self.best = r.best_before

    def _sobol(self, n: int) -> list[list[float]]:
        import torch
        from torch.quasirandom import SobolEngine

        engine = SobolEngine(self.space.dims, scramble=True, seed=self.seed)
        engine.fast_forward(len(self.points))
        return engine.draw(n).to(torch.float64).tolist()

    def _expected_utility(self, n: int) -> list[list[float]]:
        """`n` new points maximizing qEUBO of the round (the best so far pending in it) under the
        pairwise GP fitted to every comparison."""
        import torch
        from botorch.acquisition.preference import qExpectedUtilityOfBestOption
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import PairwiseGP, PairwiseLaplaceMarginalLogLikelihood
        from botorch.optim import optimize_acqf

        torch.manual_seed(self.seed * 1009 + len(self.rounds))
        X = torch.tensor(self.points, dtype=torch.float64)
        model = PairwiseGP(X, torch.tensor(self.comparisons, dtype=torch.long))
        fit_gpytorch_mll(PairwiseLaplaceMarginalLogLikelihood(model.likelihood, model))
        pending = X[[self.best]] if self.best is not None else None
        acquisition = qExpectedUtilityOfBestOption(pref_model=model, X_pending=pending)
        bounds = torch.tensor([[0.0] * self.space.dims, [1.0] * self.space.dims], dtype=torch.float64)
        if n == 1 and pending is None:
            n = 2
        points, _ = optimize_acqf(acquisition, bounds, q=n, num_restarts=4, raw_samples=128, options={"seed": self.seed + len(self.rounds)})
        return points.detach().tolist()

    def state(self) -> dict:
        """Plain data: what a page keeps in the browser to survive a reload."""
        data = asdict(self)
        data["space"] = {"shards": list(self.space.shards), "method": self.space.method, "groups": list(self.space.groups),
                         "params": [list(p) for p in self.space.params]}
        return data

    @classmethod
    def from_state(cls, data: dict) -> PreferenceSearch:
        s = data["space"]
        space = Space(tuple(s["shards"]), s["method"], tuple(s["groups"]), tuple(tuple(p) for p in s["params"]))
        rounds = [Round(**r) for r in data["rounds"]]
        return cls(space, data["seed"], data["size"], [list(p) for p in data["points"]], [tuple(c) for c in data["comparisons"]], rounds, data["best"])


def simulated_pick(search: PreferenceSearch, distance, rng: np.random.Generator, flip: float = 0.1) -> int:
    """A simulated person: the shown candidate with the smallest `distance(index)`, and with
    probability `flip` another one at random (the bench's and the tests' oracle)."""
    shown = search.current.shown
    best = min(shown, key=distance)
    if len(shown) > 1 and rng.random() < flip:
        return int(rng.choice([i for i in shown if i != best]))
    return best
