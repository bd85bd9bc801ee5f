"""The extractor role (SPEC step 2): trajectory -> N candidate skills, parsed and audited.

Training (`algorithms/evolving`) and every evaluation protocol that extracts (one-shot,
growing library) call this one function, so a skill is scored the same way everywhere.
"""

from __future__ import annotations

from evolving_rl import prompts
from evolving_rl.types import Episode, Segment


class Candidate:
    """One extractor sample: its generation, the parsed skill (or None) and the audit."""

    def __init__(self, source: int, index: int, prompt_ids: list[int], gen, skill, card: str | None, reasons: list[str]):
        self.source, self.index = source, index
        self.prompt_ids, self.gen = prompt_ids, gen
        self.skill, self.card, self.reasons = skill, card, reasons
        self.reward = 0.0
        # False when every downstream episode of this skill failed in the engine: the skill was
        # never measured, so it is neither rewarded nor trained on (0 would punish the engine's fault).
        self.measured = True

    @property
    def valid(self) -> bool:
        return self.card is not None and not self.reasons

    def segment(self) -> Segment:
        n = len(self.gen.token_ids)
        return Segment(self.prompt_ids + self.gen.token_ids, [0.0] * len(self.prompt_ids) + self.gen.logprobs,
                       [0] * len(self.prompt_ids) + [1] * n)


def extract_skills(policy, episodes: list[Episode], n: int, sampling, *, min_chars: int, max_chars: int,
                   seed: int | list[int] | None = None, max_trajectory_chars: int) -> list[Candidate]:
    """N candidate skills per episode, all in one batched generate call; never raises on bad output.

    `seed`: an int, or one seed per candidate (episode-major), as `policy.generate` takes it."""
    from evolving_rl.skills.skill import audit, parse_skill, render_card

    prompt_ids = [policy.encode_chat(prompts.extractor_messages(ep, max_trajectory_chars=max_trajectory_chars)) for ep in episodes]
    batch = [p for p in prompt_ids for _ in range(n)]
    gens = policy.generate(batch, temperature=sampling.temperature, top_p=sampling.top_p,
                           max_new_tokens=sampling.max_new_tokens, stop=None, seed=seed) if batch else []
    out = []
    for i, g in enumerate(gens):
        parsed = parse_skill(g.text, truncated=g.finish_reason == "length")
        card, reasons = None, []
        if parsed.skill is None:
            reasons = [f"unparseable: {parsed.error}"]
        else:
            card = render_card(parsed.skill)
            verdict = audit(card, min_chars=min_chars, max_chars=max_chars)
            reasons = list(verdict.reasons)
        out.append(Candidate(i // n, i % n, batch[i], g, parsed.skill, card, reasons))
    return out
