"""Solver and extractor prompts, in one place (SPEC, "Solver and extractor prompts").

Two solver formats share these texts:
- `per_step` (verl-agent style, the tiny default): every turn is a fresh prompt holding the
  task, an optional state line, the last H steps, the current observation and only the
  current admissible actions. Contexts stay ~200-400 tokens whatever the step.
- `multi_turn` (the paper's): one growing chat; the rollout engine appends env turns as
  user messages and masks them out of the loss. ~40 admissible commands per ALFWorld step
  make it reach ~10k tokens by step 50.

The reply format is always `<action>...</action>` (with free reasoning before it when
`reasoning` is on), so one parser and one stop string serve every model.
"""

from __future__ import annotations

import functools
import re

from evolving_rl.types import Episode, Turn

ACTION_STOP = "</action>"

AGENT_ROLE = {  # the solver's and extractor's framing, per environment
    "alfworld": "a household agent acting in a text world",
    "mind2web": "a web agent operating a website through its elements (CLICK [ref], TYPE [ref] text, SELECT [ref] option)",
    "scienceworld": "a science agent running experiments in a text world",
    "twx": "an agent playing a text game",
    "twc": "an agent tidying up a house in a text game",
    "textworld": "an agent playing a text adventure",
}
SOLVER_SYSTEM = (
    "You are {role}. Each step you get an observation and the list of admissible actions. {reply_rule}"
)
REPLY_PLAIN = "Reply with exactly one admissible action inside <action>...</action>."
REPLY_REASONING = (
    "Think briefly about what to do next, then reply with exactly one admissible action "
    "inside <action>...</action>."
)
SKILL_PREAMBLE = (
    "A skill extracted from a previous similar task follows. Judge whether it applies to "
    "this task; follow it where it helps and ignore it where it does not.\n\n"
    "<skill>\n{card}\n</skill>"
)

EXTRACTOR_SYSTEM = "You distil reusable skills from the past attempts of {role}."
EXTRACTOR_USER = """Task: {task}

The agent's trajectory:
<trajectory>
{trajectory}
</trajectory>

Outcome: the agent {outcome} the task.

Assess what worked and what failed, then write one reusable skill that would help on similar \
tasks. Abstract away one-off ids and entity names (write "the target object", not "apple 1"); \
do not copy the trajectory; stay grounded in what it shows; if the run failed, analyse why.
{schema_hint}"""

SCHEMA_HINT = """After any analysis, give the skill as one JSON object with the keys: name \
(kebab-case), description (1-2 sentences: what and when), metadata (task_type, outcome, \
abstraction_level, category), skill_overview (list), when_to_use (list), when_not_to_use (list), \
inputs_to_identify (list), workflow (ordered list of {goal, action, strategy, done_when}), \
decision_rules (list), error_handling (list of {error, cause, response}), output_requirements (list)."""


def agent_role(env: str) -> str:
    return AGENT_ROLE.get(env, "an agent acting in a text environment")


def solver_system(skill_card: str | None, reasoning: bool, env: str = "alfworld") -> str:
    text = SOLVER_SYSTEM.format(role=agent_role(env), reply_rule=REPLY_REASONING if reasoning else REPLY_PLAIN)
    if skill_card:
        text += "\n\n" + SKILL_PREAMBLE.format(card=skill_card.strip())
    return text


def format_admissible(admissible: list[str] | None) -> str:
    if admissible is None:
        return "(the engine does not list them)"
    return ", ".join(admissible)


def action_completion(action: str) -> str:
    """The reply a demonstration teaches: the canonical form of one action."""
    return f"<action>{action}</action>"


def action_encoder(policy):
    """action -> the ids of its completion under `policy`, memoised: the same few hundred
    actions recur in every step (the admissible-action trie, the SFT targets). Bounded, since
    an env with open-ended actions (ScienceWorld) keeps producing new ones over a long run."""
    return functools.lru_cache(maxsize=1 << 16)(lambda a: policy.encode_text(action_completion(a)))


_ACTION_RE = re.compile(r"<action>(.*?)(?:</action>|$)", re.S)


def parse_action(completion: str) -> tuple[str, bool]:
    """The action in a reply, and whether it was well formed.

    Malformed replies are not an error (SPEC: invalid actions go to the env as is, which
    answers "Nothing happens."): the last `<action>` body wins, else the last non-empty line.
    """
    found = _ACTION_RE.findall(completion)
    if found and found[-1].strip():
        return " ".join(found[-1].split())[:200], "</action>" in completion
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    return (" ".join(lines[-1].split())[:200] if lines else ""), False


# --- the state line: what the expert knows and a memoryless per-step prompt would not ---

_GO_RE = re.compile(r"^go to (.+)$")
_ROOM_RE = re.compile(r"Looking quickly around you, you see (.+?)\.(?:\s|$)", re.S)
# "On the desk 1, you see ..." and, for an opened one, "The drawer 2 is open. In it, you see ..."
_SEE_RE = re.compile(r"(?:(?:On|In) the|The) (.+?)(?:, | is open\. In it, )you see (.+?)\.", re.S)
_TAKE_RE = re.compile(r"You pick up the (.+?) from the (.+?)\.")
_PUT_RE = re.compile(r"You (?:move|put) the (.+?) (?:to|in|on|in/on) the (.+?)\.")
_TREAT_RE = re.compile(r"You (heat|cool|clean) the (.+?) using the")
_TREATED = {"heat": "heated", "cool": "cooled", "clean": "cleaned"}


def _listed(items: str) -> list[str]:
    """'a apple 1, a knife 2, and a mug 3' -> ['apple 1', 'knife 2', 'mug 3']."""
    out = []
    for obj in re.split(r",\s*(?:and\s+)?|\s+and\s+", items):
        obj = obj.strip().removeprefix("a ").removeprefix("an ").strip()
        if obj and obj != "nothing":
            out.append(obj)
    return out


def state_line(turns: list[Turn], max_items: int = 12, task: str = "") -> str:
    """Places not yet visited, objects seen and where, the task's objects in view, and what is
    held (and whether it was heated, cooled or cleaned), from the text alone.

    A per-step prompt shows only the last few steps, so without this the agent forgets what
    it has already searched (the warm-start probe revisited a checked receptacle in 69% of
    its moves, the expert 15%: SPEC). When the first observation lists the room, the line
    names the places still unvisited, in the room's order: the expert searches the likely
    ones among them from the end of that list, so the choice it makes is visible in one line
    instead of being a function of the whole episode. Otherwise it names the visited places.

    `Task objects here` names the objects in the current observation whose kind is a word of
    `task` (`spoon 1` for "put a clean spoon in drawer"). The warm start without it never
    took anything (0/42 expert `take` steps, teacher-forced): matching a word at the prompt's
    end against an object listed in the observation is the step a from-scratch model fails
    to learn in a CPU budget, and a pretrained one does not need.
    """
    room = _listed(m.group(1)) if turns and (m := _ROOM_RE.search(turns[0].observation)) else []
    visited: list[str] = []
    seen: dict[str, str] = {}
    held: str | None = None
    treated: dict[str, str] = {}  # object -> heated / cooled / cleaned: gone from a short history
    for i, t in enumerate(turns):
        m = _GO_RE.match(t.action)
        if m and m.group(1) not in visited:
            visited.append(m.group(1))
        reply = turns[i + 1].observation if i + 1 < len(turns) else ""
        for place, items in _SEE_RE.findall(reply):
            for obj in _listed(items):
                seen[obj] = place
        if m2 := _TAKE_RE.search(reply):
            held = m2.group(1)
            seen.pop(held, None)
        if m3 := _PUT_RE.search(reply):
            seen[m3.group(1)] = m3.group(2)
            if held == m3.group(1):
                held = None
        if m4 := _TREAT_RE.search(reply):
            treated[m4.group(2)] = _TREATED[m4.group(1)]
    parts = []
    if room:
        parts.append("Unvisited: " + (", ".join(r for r in room if r not in visited) or "none"))
    elif visited:
        parts.append("Visited: " + ", ".join(visited[-max_items:]))
    if seen:
        items = list(seen.items())[-max_items:]
        parts.append("Seen: " + ", ".join(f"{o} ({p})" for o, p in items))
    words = set(re.findall(r"[a-z]+", task.lower()))
    here = [o for _, items in _SEE_RE.findall(turns[-1].observation if turns else "") for o in _listed(items)]
    if wanted := [o for o in here if o.rstrip("0123456789 ") in words]:
        parts.append("Task objects here: " + ", ".join(wanted[:max_items]))
    parts.append("Holding: " + (f"{held} ({treated[held]})" if held in treated else held or "nothing"))
    return ". ".join(parts) + "."


def per_step_messages(
    description: str,
    turns: list[Turn],
    observation: str,
    admissible: list[str] | None,
    *,
    skill_card: str | None,
    env: str = "alfworld",
    history: int,
    use_state_line: bool,
    reasoning: bool,
    step: int,
    max_steps: int,
    list_admissible: bool = True,
) -> list[dict[str, str]]:
    """The per-step prompt for turn `step` (1-based), given the turns before it.

    Without `list_admissible` the admissible actions live only in the decoding mask: ~40% of
    a tiny model's prompt tokens (~340 -> ~210 on ALFWorld), which it need not read to choose among them."""
    # What decides the next action (the state, the observation and the task) comes last,
    # right before the reply: a small model trained from scratch learns to read nearby
    # tokens first (it took the wrong object while the task sat at the top).
    lines = ["Admissible actions: " + format_admissible(admissible)] if list_admissible else []
    recent = turns[-history:] if history else []
    if recent:  # each past action with what it led to; the last one's result is the observation below
        lines.append("Recent steps:")
        offset = len(turns) - len(recent)
        for j, t in enumerate(recent):
            after = turns[offset + j + 1].observation if offset + j + 1 < len(turns) else None
            lines.append(f"> {t.action}" + (f"\n{_squash(after)}" if after is not None else ""))
    if use_state_line:
        lines.append("State: " + state_line(turns + [Turn(observation, admissible, "", "", True)], task=description))
    lines.append(f"Step {step}/{max_steps}. Observation: {_squash(observation)}")
    lines.append(f"Task: {description}")
    return [
        {"role": "system", "content": solver_system(skill_card, reasoning, env)},
        {"role": "user", "content": "\n".join(lines)},
    ]


def multi_turn_first_messages(
    description: str, observation: str, admissible: list[str] | None, *, skill_card: str | None, reasoning: bool,
    env: str = "alfworld",
) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": solver_system(skill_card, reasoning, env)},
        {
            "role": "user",
            "content": f"Task: {description}\n\nStep 1. Observation: {_squash(observation)}\n"
            f"Admissible actions: {format_admissible(admissible)}",
        },
    ]


def multi_turn_env_message(step: int, observation: str, admissible: list[str] | None) -> dict[str, str]:
    return {
        "role": "user",
        "content": f"Step {step}. Observation: {_squash(observation)}\nAdmissible actions: {format_admissible(admissible)}",
    }


def extractor_messages(episode: Episode, *, schema_hint: bool = True,
                       max_trajectory_chars: int | None = 6000) -> list[dict[str, str]]:
    """The extractor reads the task, the whole trajectory and the true success flag (SPEC step 2).

    A trajectory longer than `max_trajectory_chars` (None: no limit) keeps its start (the
    room) and its end (the outcome), cut at line boundaries, with a marker that says how much
    of the middle is not shown, so the extractor never mistakes a cut for what happened.
    """
    traj = clip_middle(episode.transcript(), max_trajectory_chars)
    user = EXTRACTOR_USER.format(
        task=episode.task.description,
        trajectory=traj,
        outcome="completed" if episode.won else "did not complete",
        schema_hint=SCHEMA_HINT if schema_hint else "",
    )
    system = EXTRACTOR_SYSTEM.format(role=agent_role(episode.task.env))
    return [{"role": "system", "content": system}, {"role": "user", "content": user.strip()}]


def clip_middle(text: str, limit: int | None) -> str:
    """`text` whole if it fits in `limit` characters, else head and tail (whole lines where
    possible) around an explicit marker naming what was left out."""
    if limit is None or len(text) <= limit:
        return text
    half = max(1, limit // 2)
    head, tail = text[:half], text[-half:]
    if "\n" in head[1:]:
        head = head[: head.rindex("\n")]
    if "\n" in tail[:-1]:
        tail = tail[tail.index("\n") + 1:]
    lines = max(0, text[len(head): len(text) - len(tail)].count("\n") - 1)  # the cut's own two line breaks
    marker = (f"[... {len(text) - len(head) - len(tail)} characters ({lines} lines) from the middle of this trajectory "
              f"are not shown: it is longer than the {limit} characters the extractor reads ...]")
    return f"{head}\n{marker}\n{tail}"


def _squash(text: str) -> str:
    """ALFWorld pads observations with blank lines and '-= Welcome =-' banners; keep the words."""
    return " ".join(text.replace("-= Welcome to TextWorld, ALFRED! =-", "").split())
