"""The guardrails' two judgements: is a skill's measured effect real, and is its text safe to
store and show.

Effect: each skill is compared with its own no-skill control, the episodes that matched it but
were played without any skill by random assignment, so task mix cancels out. With few
episodes a rate is noise (1/1 vs 0/1 says nothing), so the decision uses the posterior of the
success rates under a uniform prior, Beta(1 + wins, 1 + losses) for each arm, and acts only
when P(skill - control > margin) (promote) or P(control - skill > margin) (retire) reaches the
configured confidence, after both arms have at least `min_uses` episodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Fixed: the same counts must always give the same decision (a guardrail that flips on a
# re-run cannot be audited). 20,000 draws put the Monte Carlo error of a probability < 0.004.
_DRAWS = 20_000
_SEED = 20_260_512


@dataclass(frozen=True)
class Lift:
    """The skill's success rate minus its control's, as a posterior."""

    mean: float
    lo: float  # 95% credible interval
    hi: float
    p_better: float  # P(lift > margin)
    p_worse: float  # P(lift < -margin)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi], "p_better": self.p_better, "p_worse": self.p_worse}


def lift_posterior(wins: float, uses: int, ctrl_wins: float, ctrl_uses: int, margin: float = 0.0) -> Lift:
    """Posterior of (skill rate - control rate); `wins` may be fractional (scores in [0, 1])."""
    if not (0 <= wins <= uses and 0 <= ctrl_wins <= ctrl_uses):
        raise ValueError(f"counts: wins {wins}/{uses}, control {ctrl_wins}/{ctrl_uses}: wins must lie in [0, uses]")
    rng = np.random.default_rng(_SEED)
    s = rng.beta(1 + wins, 1 + uses - wins, _DRAWS)
    c = rng.beta(1 + ctrl_wins, 1 + ctrl_uses - ctrl_wins, _DRAWS)
    d = s - c
    lo, hi = np.quantile(d, [0.025, 0.975])
    return Lift(float(d.mean()), float(lo), float(hi), float((d > margin).mean()), float((d < -margin).mean()))


def decide(status: str, wins: float, uses: int, ctrl_wins: float, ctrl_uses: int, *, min_uses: int,
           confidence: float, margin: float) -> tuple[str | None, str]:
    """'promoted', 'retired' or None (keep measuring), and the reason in numbers.

    A promoted skill stays under measurement (the control share keeps running), so one that
    stops helping, or only looked good by luck, is still retired later."""
    if uses < min_uses or ctrl_uses < min_uses:
        return None, f"measuring: {uses} uses, {ctrl_uses} control episodes (need {min_uses} each)"
    lift = lift_posterior(wins, uses, ctrl_wins, ctrl_uses, margin)
    numbers = (f"success {wins:g}/{uses} vs control {ctrl_wins:g}/{ctrl_uses}, lift {lift.mean:+.3f} "
               f"[{lift.lo:+.3f}, {lift.hi:+.3f}]")
    if lift.p_worse >= confidence:
        return "retired", f"worse than the no-skill control: {numbers}, P(worse by > {margin:g}) = {lift.p_worse:.3f}"
    if status == "quarantined" and lift.p_better >= confidence:
        return "promoted", f"beats the no-skill control: {numbers}, P(better by > {margin:g}) = {lift.p_better:.3f}"
    return None, f"undecided: {numbers}"


# Markup a browser or a Markdown renderer would act on. Skills are shown in the HTML report and
# returned by the API: escaping protects our own pages, but a consumer that renders a card as
# Markdown would not escape it, so such text never enters the library.
_MARKUP = re.compile(
    r"<\s*/?\s*(script|iframe|img|svg|style|object|embed|link|meta|a|form|input|button|body|html|base|frame|video|audio)\b"
    r"|\bjavascript\s*:|\bdata\s*:\s*text/html|\bon[a-z]+\s*=",
    re.I,
)


def hostile_markup(text: str) -> str | None:
    """The first piece of active HTML in `text`, or None."""
    m = _MARKUP.search(text)
    return m.group(0) if m else None
