"""Prompt building and reply parsing: malformed model output is handled, never a crash."""

from hypothesis import given, strategies as st

from evolving_rl import prompts
from evolving_rl.types import Episode, Task, Turn


def test_parse_action_forms():
    assert prompts.parse_action("<action>go to cabinet 1</action>") == ("go to cabinet 1", True)
    assert prompts.parse_action("I think.\n<action> take  apple 1 from table 1 </action>") == ("take apple 1 from table 1", True)
    assert prompts.parse_action("<action>open drawer 2") == ("open drawer 2", False)  # cut off by the token limit
    assert prompts.parse_action("look") == ("look", False)
    assert prompts.parse_action("") == ("", False)
    assert prompts.parse_action("<action>a</action><action>b</action>")[0] == "b"


@given(st.text())
def test_parse_action_never_raises(text):
    action, _ = prompts.parse_action(text)
    assert isinstance(action, str) and len(action) <= 200


def test_state_line_tracks_visits_sightings_and_holding():
    turns = [
        Turn("You are in the middle of a room.", None, "", "go to countertop 1", True),
        Turn("On the countertop 1, you see a apple 1, a knife 2, and a mug 3.", None, "", "take apple 1 from countertop 1", True),
        Turn("You pick up the apple 1 from the countertop 1.", None, "", "go to fridge 1", True),
        Turn("The fridge 1 is closed.", None, "", "", True),
    ]
    line = prompts.state_line(turns)
    assert "Visited: countertop 1, fridge 1" in line
    assert "knife 2 (countertop 1)" in line and "mug 3 (countertop 1)" in line
    assert "Holding: apple 1" in line
    turns[-1].action = "heat apple 1 with microwave 1"
    turns.append(Turn("You heat the apple 1 using the microwave 1.", None, "", "", True))
    assert "Holding: apple 1 (heated)" in prompts.state_line(turns)
    turns.append(Turn("You move the apple 1 to the fridge 1.", None, "", "", True))
    turns[-2].action = "move apple 1 to fridge 1"
    assert "Holding: nothing" in prompts.state_line(turns)


def test_state_line_names_unvisited_places_in_the_rooms_order():
    room = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, "
            "you see a cabinet 2, a cabinet 1, a fridge 1, and a sinkbasin 1.\n\nYour task is to: put a apple in fridge.")
    turns = [Turn(room, None, "", "go to cabinet 1", True), Turn("The cabinet 1 is closed.", None, "", "", True)]
    assert prompts.state_line(turns).startswith("Unvisited: cabinet 2, fridge 1, sinkbasin 1.")
    turns[-1].action = "go to cabinet 2"
    turns += [Turn("You arrive at cabinet 2.", None, "", "go to fridge 1", True), Turn("x", None, "", "go to sinkbasin 1", True),
              Turn("You arrive at sinkbasin 1.", None, "", "", True)]
    assert prompts.state_line(turns).startswith("Unvisited: none.")


def test_state_line_records_opened_receptacles_and_the_task_objects_in_view():
    turns = [
        Turn("You are in the middle of a room.", None, "", "go to drawer 2", True),
        Turn("You arrive at drawer 2. The drawer 2 is closed.", None, "", "open drawer 2", True),
        Turn("You open the drawer 2. The drawer 2 is open. In it, you see a fork 2, a spoon 1, and a spoon 12.", None, "", "", True),
    ]
    line = prompts.state_line(turns, task="put some spoon on sinkbasin.")
    assert "fork 2 (drawer 2)" in line and "spoon 1 (drawer 2)" in line  # an opened receptacle's contents count as seen
    assert "Task objects here: spoon 1, spoon 12." in line  # the task's kind, not the fork; not 'spoonbill'-style prefixes
    assert "Task objects here" not in prompts.state_line(turns, task="put a knife in drawer.")
    turns[-1].action = "close drawer 2"
    turns.append(Turn("You close the drawer 2.", None, "", "", True))
    assert "Task objects here" not in prompts.state_line(turns, task="put some spoon on sinkbasin.")  # only what is in view


def test_per_step_prompt_can_leave_the_admissible_list_to_the_decoding_mask():
    kw = dict(skill_card=None, history=2, use_state_line=True, reasoning=False, step=1, max_steps=50)
    listed = prompts.per_step_messages("t", [], "obs", ["look", "go to fridge 1"], **kw)[1]["content"]
    unlisted = prompts.per_step_messages("t", [], "obs", ["look", "go to fridge 1"], list_admissible=False, **kw)[1]["content"]
    assert "Admissible actions: look, go to fridge 1" in listed
    assert "Admissible" not in unlisted and "go to fridge 1" not in unlisted and unlisted in listed


def test_per_step_prompt_shows_each_observation_once():
    turns = [Turn("obs 0", ["look"], "", "act 0", True), Turn("obs 1", ["look"], "", "act 1", True)]
    user = prompts.per_step_messages("t", turns, "obs now", ["look"], skill_card=None, history=2, use_state_line=False,
                                     reasoning=False, step=3, max_steps=50)[1]["content"]
    assert "> act 0\nobs 1\n> act 1\nStep 3/50. Observation: obs now" in user and user.count("obs now") == 1


def test_per_step_prompt_holds_skill_history_and_admissible():
    turns = [Turn(f"obs {i}", ["look"], "", f"act {i}", True) for i in range(5)]
    msgs = prompts.per_step_messages("put a apple in fridge.", turns, "obs now", ["look", "go to fridge 1"],
                                     skill_card="# skill card", history=2, use_state_line=False, reasoning=False,
                                     step=6, max_steps=50)
    assert "# skill card" in msgs[0]["content"] and "judge whether it applies" in msgs[0]["content"].lower()
    user = msgs[1]["content"]
    assert "> act 3" in user and "> act 4" in user and "> act 2" not in user
    assert "Admissible actions: look, go to fridge 1" in user and "Step 6/50" in user
    no_skill = prompts.per_step_messages("t", [], "o", None, skill_card=None, history=2, use_state_line=True,
                                         reasoning=False, step=1, max_steps=50)
    assert "<skill>" not in no_skill[0]["content"]


def test_extractor_prompt_carries_task_trajectory_and_true_outcome():
    task = Task("t1", "train", "pick_and_place_simple", "put a apple in fridge.", "x")
    ep = Episode(task=task, turns=[Turn("You are in a room.", None, "", "go to fridge 1", True)], won=False,
                 final_observation="The fridge 1 is closed.")
    user = prompts.extractor_messages(ep)[1]["content"]
    assert "put a apple in fridge." in user and "go to fridge 1" in user and "The fridge 1 is closed." in user
    assert "did not complete" in user and "workflow" in user


def test_capped_eval_sets_cover_every_task_type():
    from evolving_rl.evaluate import cap_tasks

    tasks = [Task(f"{t}{i}", "eval_seen", t, "d", f"{t}{i}") for t in "abc" for i in range(4)]
    assert [t.id for t in cap_tasks(tasks, 5)] == ["a0", "b0", "c0", "a1", "b1"]
    assert cap_tasks(tasks, None) == tasks and cap_tasks(tasks, 99) == tasks
