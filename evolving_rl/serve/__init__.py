"""Deployment: a self-evolving agent that keeps learning after launch, behind guardrails.

`evolver.SkillEvolver` is the skill lifecycle (quarantine, no-skill control share, promotion
and retirement with confidence, audit log, versions) that `evolving-rl evolve`, the `library`
evaluation protocol and `evolving-rl serve` (`app`) all run. Training never imports this package.
"""
