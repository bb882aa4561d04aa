"""The toy embodied world: its state as numbers, its renders, the answers of its tasks, the scripted policy and the
oracle's plans, and the seeded train and held-out splits."""

import dataclasses
import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from palme_hf.embodied_world import (
    GRID_SIZE,
    MAX_OBJECTS,
    OBJECT_DIM,
    RELATIONS,
    STATE_DIM,
    TASKS,
    EmbodiedTaskDataset,
    Goal,
    Scene,
    SceneObject,
    execute,
    format_plan,
    goal_holds,
    goal_split,
    next_step_prompt,
    object_number,
    object_vectors,
    oracle_plan,
    parse_goal,
    parse_plan,
    plan_succeeds,
    refused_steps,
    render,
    sample_example,
    sample_scene,
    scene_from_json,
    scene_split,
    state_vector,
)
from palme_hf.synthetic_shapes import BACKGROUND, COLOURS, SHAPES


def two_objects() -> Scene:
    return Scene(
        (
            SceneObject("circle", "red", "large", column=3, row=0),
            SceneObject("square", "blue", "tiny", column=0, row=2),
        )
    )


def examples(task: str, split: str = "train", num_samples: int = 150, seed: int = 0) -> list:
    dataset = EmbodiedTaskDataset(num_samples, split, seed=seed, tasks=(task,))
    return [dataset[index] for index in range(num_samples)]


def colour_and_shape(vector: torch.Tensor) -> str:
    """The description ("red circle") that the one-hot parts of an object vector say."""
    colour = list(COLOURS)[int(vector[3 : 3 + len(COLOURS)].argmax())]
    return f"{colour} {SHAPES[int(vector[3 + len(COLOURS) :].argmax())]}"


def test_object_and_state_vectors_follow_the_documented_layout():
    scene = two_objects()
    expected = torch.tensor(
        [
            [3.5 / 4, 0.5 / 4, 0.95 / 4, 1, 0, 0, 0, 1, 0, 0],  # red circle, right column, top row
            [0.5 / 4, 2.5 / 4, 0.35 / 4, 0, 0, 1, 0, 0, 1, 0],  # blue square, left column, third row
        ]
    )
    vectors = object_vectors(scene)
    assert vectors.shape == (2, OBJECT_DIM) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, expected)
    state = state_vector(scene)
    assert state.shape == (STATE_DIM,) == (MAX_OBJECTS * (1 + OBJECT_DIM),)
    slots = state.view(MAX_OBJECTS, 1 + OBJECT_DIM)
    torch.testing.assert_close(slots[:2, 0], torch.ones(2))
    torch.testing.assert_close(slots[:2, 1:], expected)
    assert not slots[2:].any()


@pytest.mark.parametrize("image_size", [64, 96])
def test_render_draws_each_object_where_its_state_says(image_size):
    cell = image_size // GRID_SIZE
    for example in examples("referral", num_samples=40, seed=image_size):
        image = np.asarray(render(example.scene, image_size)).astype(int)
        assert image.shape == (image_size, image_size, 3)
        drawn = (image != BACKGROUND).any(axis=-1)
        for vector in object_vectors(example.scene):
            x, y, side = (float(value) * image_size for value in vector[:3])
            # The object's cell holds its colour alone, in a bounding box of its side centred at (x, y), filled as
            # its shape fills it (square ~1, circle ~pi/4, triangle ~1/2).
            left, top = int(x) - cell // 2, int(y) - cell // 2
            region = image[top : top + cell, left : left + cell]
            filled = drawn[top : top + cell, left : left + cell]
            colour, shape = colour_and_shape(vector).split()
            assert {tuple(pixel) for pixel in region[filled]} == {COLOURS[colour]}
            rows, columns = np.nonzero(filled)
            width, height = columns.max() - columns.min() + 1, rows.max() - rows.min() + 1
            # Pillow fills both end pixels of a box: a drawn side is up to two pixels longer.
            assert 0 <= width - side <= 2 and 0 <= height - side <= 2, (width, height, side)
            assert abs(left + (columns.min() + columns.max() + 1) / 2 - x) <= 1
            assert abs(top + (rows.min() + rows.max() + 1) / 2 - y) <= 1
            if side >= 10:
                fill = filled.sum() / (width * height)
                assert shape == ("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"), fill
            drawn[top : top + cell, left : left + cell] = False
        assert not drawn.any()  # nothing outside the objects' cells


def test_relation_answers_are_the_geometry_of_the_state():
    answers = []
    for example in examples("relation", num_samples=200):
        match = re.fullmatch(rf"Q: Is obj_(\d) ({'|'.join(RELATIONS)}) obj_(\d)\? A:", example.prompt)
        first, relation, second = int(match.group(1)), match.group(2), int(match.group(3))
        vectors = object_vectors(example.scene)
        (x, y), (other_x, other_y) = vectors[first - 1, :2].tolist(), vectors[second - 1, :2].tolist()
        holds = {"left of": x < other_x, "right of": x > other_x, "above": y < other_y, "below": y > other_y}
        assert example.answer == ("yes" if holds[relation] else "no"), example
        answers.append(example.answer)
    assert 80 <= answers.count("yes") <= 120  # as often yes as no


def test_size_and_referral_answers_name_the_right_object():
    for example in examples("size"):
        sides = object_vectors(example.scene)[:, 2]
        wanted = sides.argmax() if "largest" in example.prompt else sides.argmin()
        assert example.prompt in ("Q: Which object is largest? A:", "Q: Which object is smallest? A:")
        assert example.answer == f"obj_{int(wanted) + 1}"
    for example in examples("referral"):
        number = int(re.fullmatch(r"obj_(\d)", example.answer).group(1))
        description = re.fullmatch(r"Q: Which object is the (\w+ \w+)\? A:", example.prompt).group(1)
        assert colour_and_shape(object_vectors(example.scene)[number - 1]) == description


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_executing_the_oracle_plan_makes_every_goal_hold(split):
    plans = examples("plan", split, num_samples=200)
    assert {len(example.scene.objects) for example in plans} == {2, 3, 4}
    assert {1, 2, 3, 4} <= {len(parse_plan(example.answer)) for example in plans}
    for example in plans:
        goal, scene = example.goal, example.scene
        assert example.prompt == f"Q: How to {goal.text}? A:"
        steps = parse_plan(example.answer)
        assert steps == oracle_plan(scene, goal) and format_plan(steps) == example.answer
        assert not goal_holds(scene, goal)
        descriptions = [colour_and_shape(vector) for vector in object_vectors(scene)]
        subject = f"obj_{descriptions.index(goal.subject) + 1}"
        for step in steps:
            assert not goal_holds(scene, goal)  # the plan stops as soon as the goal holds
            assert step.split()[1] == subject  # and moves the goal's subject alone
            scene = execute(scene, step)
        assert goal_holds(scene, goal)
        assert plan_succeeds(example.scene, goal, example.answer)
        assert not plan_succeeds(example.scene, goal, format_plan(steps[:-1]))


def test_next_step_answers_lead_the_closed_loop_to_the_goal():
    # With the same draws, a next-step example is a state along the plan example's oracle plan, with its goal.
    plans, next_steps = examples("plan", num_samples=200), examples("next_step", num_samples=200)
    steps_done = []
    for plan, example in zip(plans, next_steps):
        assert example.goal == plan.goal and example.prompt.endswith(
            f"Q: What is the next step to {plan.goal.text}? A:"
        )
        states = [plan.scene]
        for step in parse_plan(plan.answer)[:-1]:
            states.append(execute(states[-1], step))
        steps_done.append(states.index(example.scene))
        remaining = oracle_plan(example.scene, example.goal)
        assert example.answer == remaining[0]
        assert len(oracle_plan(execute(example.scene, example.answer), example.goal)) == len(remaining) - 1
    assert steps_done.count(0) < 150 and max(steps_done) >= 3  # the states a closed loop meets, not only starts


def test_next_step_prompts_name_some_steps_the_policy_refuses_and_the_answer_is_none_of_them():
    named = []
    for example in examples("next_step", num_samples=300):
        subject = object_number(example.scene, example.goal.subject)
        refusable = refused_steps(example.scene, subject)
        refused = [step for step in refusable if f"{step} failed" in example.prompt]
        assert example.prompt == next_step_prompt(example.goal, refused) and example.answer not in refusable
        named.append(len(refused))
    assert 0.2 < sum(count > 0 for count in named) / len(named) < 0.8 and max(named) >= 2
    goal = Goal("red circle", "right of", "blue square")
    assert next_step_prompt(goal) == "Q: What is the next step to put the red circle right of the blue square? A:"
    assert next_step_prompt(goal, ["move obj_1 right", " move obj_1 up "]) == (
        "move obj_1 right failed move obj_1 up failed "
        "Q: What is the next step to put the red circle right of the blue square? A:"
    )


def test_refused_steps_are_those_off_the_grid_or_into_a_taken_cell():
    scene = Scene(
        (
            SceneObject("circle", "red", "small", column=0, row=1),
            SceneObject("square", "blue", "tiny", column=1, row=1),
        )
    )
    assert refused_steps(scene, 1) == ["move obj_1 left", "move obj_1 right"]
    assert refused_steps(scene, 2) == ["move obj_2 left"]


def test_the_oracle_goes_around_objects_and_refuses_a_walled_in_subject():
    # obj_1 (red circle) at the left of row 1, obj_2 (blue square) right beside it, obj_3 (green triangle) below it.
    scene = Scene(
        (
            SceneObject("circle", "red", "small", column=0, row=1),
            SceneObject("square", "blue", "tiny", column=1, row=1),
            SceneObject("triangle", "green", "large", column=0, row=2),
        )
    )
    goal = Goal("red circle", "right of", "blue square")
    assert oracle_plan(scene, goal) == ["move obj_1 up", "move obj_1 right", "move obj_1 right"]
    assert oracle_plan(scene, Goal("blue square", "right of", "red circle")) == []
    with pytest.raises(
        ValueError, match="'put the blue square left of the red circle': no cell that the blue square "
    ):
        oracle_plan(scene, Goal("blue square", "left of", "red circle"))  # the red circle is in the first column
    walled_in = Scene((*scene.objects, SceneObject("circle", "yellow", "medium", column=0, row=0)))
    with pytest.raises(
        ValueError, match="No plan reaches 'put the red circle right of the blue square': no cell that "
    ):
        oracle_plan(walled_in, goal)
    with pytest.raises(ValueError, match="The scene has no 'green circle': its objects are \\['red circle', "):
        goal_holds(scene, Goal("green circle", "above", "red circle"))


@pytest.mark.parametrize(
    "step, message",
    [
        (
            "move obj_1 sideways",
            "Cannot execute 'move obj_1 sideways': a step is 'move obj_N DIRECTION' with DIRECTION",
        ),
        ("push obj_1 left", "Cannot execute 'push obj_1 left': a step is"),
        ("move obj_1", "Cannot execute 'move obj_1': a step is"),
        ("move obj_1 left move obj_2 up", "Cannot execute 'move obj_1 left move obj_2 up': a step is"),
        ("1. move obj_1 up", "Cannot execute '1. move obj_1 up': a step is"),
        ("", "Cannot execute '': a step is"),
        (None, "Cannot execute None: a step is"),
        ("move obj_3 left", "Cannot execute 'move obj_3 left': the scene has obj_1 to obj_2"),
        ("move obj_0 left", "Cannot execute 'move obj_0 left': the scene has obj_1 to obj_2"),
        ("move obj_1 right", "Cannot execute 'move obj_1 right': it moves obj_1 off the grid."),
        ("move obj_1 up", "Cannot execute 'move obj_1 up': it moves obj_1 off the grid."),
        ("move obj_2 left", "Cannot execute 'move obj_2 left': it moves obj_2 off the grid."),
    ],
)
def test_malformed_or_impossible_steps_raise_naming_them(step, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        execute(two_objects(), step)


def test_steps_move_one_object_one_cell_and_a_step_into_a_taken_cell_raises():
    scene = two_objects()
    moved = execute(scene, " move obj_2 up\n")
    assert (moved.objects[1].column, moved.objects[1].row) == (0, 1) and moved.objects[0] == scene.objects[0]
    assert execute(execute(moved, "move obj_2 right"), "move obj_2 left") == moved
    beside = execute(execute(scene, "move obj_1 down"), "move obj_1 left")
    with pytest.raises(ValueError, match="Cannot execute 'move obj_2 up': the cell is taken by obj_1"):
        execute(execute(execute(beside, "move obj_1 left"), "move obj_1 left"), "move obj_2 up")


def test_plans_are_numbered_steps():
    steps = ["move obj_1 right", "move obj_2 up"]
    assert format_plan(steps) == "1. move obj_1 right 2. move obj_2 up"
    assert parse_plan(" 1. move obj_1 right  2.  move obj_2 up ") == steps
    assert parse_plan(format_plan([])) == []
    goal = Goal("red circle", "below", "blue square")
    for plan in ("move obj_1 down", "2. move obj_1 down", "1. move obj_1 down 3. move obj_1 down", "1.move obj_1"):
        with pytest.raises(
            ValueError, match=f"Cannot read the plan {re.escape(repr(plan))}: a plan is steps numbered"
        ):
            parse_plan(plan)
        assert not plan_succeeds(two_objects(), goal, plan)
    assert not plan_succeeds(two_objects(), goal, "1. move obj_1 up")  # off the grid
    assert plan_succeeds(two_objects(), goal, "1. move obj_1 down 2. move obj_1 down 3. move obj_1 down")


def test_scenes_and_goals_are_read_from_json_and_words():
    scene = two_objects()
    value = json.loads(json.dumps([dataclasses.asdict(item) for item in scene.objects]))
    assert scene_from_json(value) == scene
    for goal in (Goal("red circle", "right of", "blue square"), Goal("yellow triangle", "above", "green circle")):
        assert parse_goal(goal.text) == goal and parse_goal(f"  {goal.text}\n") == goal


@pytest.mark.parametrize(
    "value, message",
    [
        ({"objects": []}, "A scene is a JSON list of objects, each with the keys ('shape', 'colour', 'size', "),
        ([["circle", "red", "tiny", 0, 0]], "Object 1 of the scene must have exactly the keys"),
        (
            [{"shape": "circle", "colour": "red", "size": "tiny", "column": 0}],
            "Object 1 of the scene must have exactly the keys ('shape', 'colour', 'size', 'column', 'row'), got",
        ),
        (
            [{"shape": "circle", "colour": "red", "size": "tiny", "column": 0, "row": 0, "mass": 1}],
            "Object 1 of the scene must have exactly the keys",
        ),
        ([{"shape": "circle", "colour": "red", "size": "tiny", "column": "0", "row": 0}], "`column` must be an"),
        ([], "`objects` must be 1 to 4 SceneObjects, got ()"),
    ],
)
def test_a_bad_scene_in_json_raises_naming_it(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        scene_from_json(value)


@pytest.mark.parametrize(
    "text",
    [
        "put red circle right of the blue square",
        "put the pink circle right of the blue square",
        "put the red circle near the blue square",
        "put the red circle right of the blue square and the green circle",
        "put the red circle right of the red circle",
    ],
)
def test_a_goal_that_cannot_be_read_raises_naming_it(text):
    message = "Cannot read the goal" if "the red circle right of the red" not in text else "must be two objects"
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_goal(text)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: SceneObject("star", "red", "tiny", 0, 0),
            "`shape` must be one of ('circle', 'square', 'triangle'), got 'star'",
        ),
        (lambda: SceneObject("circle", "purple", "tiny", 0, 0), "`colour` must be one of"),
        (
            lambda: SceneObject("circle", "red", "huge", 0, 0),
            "`size` must be one of ('tiny', 'small', 'medium', 'large')",
        ),
        (
            lambda: SceneObject("circle", "red", "tiny", GRID_SIZE, 0),
            f"`column` must be an integer from 0 to {GRID_SIZE - 1}, got 4",
        ),
        (lambda: SceneObject("circle", "red", "tiny", 0, 1.0), "`row` must be an integer from 0 to 3, got 1.0"),
        (lambda: Scene(()), "`objects` must be 1 to 4 SceneObjects, got ()"),
        (lambda: Scene(two_objects().objects * 3), "`objects` must be 1 to 4 SceneObjects"),
        (
            lambda: Scene((SceneObject("circle", "red", "tiny", 0, 0), SceneObject("square", "red", "small", 0, 0))),
            "Scene: two objects share a cell, in [(0, 0), (0, 0)]; each must have its own.",
        ),
        (
            lambda: Scene((SceneObject("circle", "red", "tiny", 0, 0), SceneObject("square", "red", "tiny", 1, 0))),
            "Scene: two objects share a size, in ['tiny', 'tiny']",
        ),
        (
            lambda: Scene((SceneObject("circle", "red", "tiny", 0, 0), SceneObject("circle", "red", "small", 1, 0))),
            "Scene: two objects share a colour and shape, in ['red circle', 'red circle']",
        ),
        (
            lambda: Goal("red circle", "near", "blue square"),
            "`relation` must be one of ('left of', 'right of', 'above', 'below'), got 'near'",
        ),
        (
            lambda: Goal("red circle", "above", "red circle"),
            "the subject and the reference must be two objects, got 'red circle' twice",
        ),
        (lambda: render(two_objects(), 24), "`image_size` must be an integer of at least 32 pixels, got 24"),
        (lambda: EmbodiedTaskDataset(-1), "`num_samples` must be an integer >= 0, got -1"),
        (lambda: EmbodiedTaskDataset(4, "test"), "`split` must be one of ('train', 'held_out'), got 'test'"),
        (lambda: EmbodiedTaskDataset(4, tasks=("plan", "dance")), "`tasks` must be distinct names of"),
        (lambda: EmbodiedTaskDataset(4, tasks=()), "`tasks` must be distinct names of"),
        (lambda: sample_example(random.Random(0), "train", "dance"), "`task` must be one of ('relation', 'size', "),
        (lambda: sample_scene(random.Random(0), "validation"), "`split` must be one of"),
    ],
)
def test_bad_scenes_goals_and_arguments_raise(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_the_same_seed_gives_the_same_examples_and_another_seed_others():
    first, again = EmbodiedTaskDataset(40, seed=3), EmbodiedTaskDataset(40, seed=3)
    other = EmbodiedTaskDataset(40, seed=4)
    items = [first[index] for index in range(40)]
    assert items == [again[index] for index in range(40)]
    assert [item.task for item in items] == list(TASKS) * 8
    assert sum(item != other[index] for index, item in enumerate(items)) > 30
    assert render(items[0].scene).tobytes() == render(again[0].scene).tobytes()
    with pytest.raises(IndexError, match="index 40 is out of range for a dataset of 40 samples"):
        first[40]


def test_held_out_scenes_and_goals_never_appear_in_training():
    def object_set(scene):
        return frozenset((item.shape, item.colour, item.size) for item in scene.objects)

    train = [item for seed in (0, 1) for item in EmbodiedTaskDataset(400, "train", seed=seed)]
    held_out = [item for seed in (0, 1) for item in EmbodiedTaskDataset(200, "held_out", seed=seed)]
    assert {scene_split(item.scene) for item in train} == {"train"}
    assert {scene_split(item.scene) for item in held_out} == {"held_out"}
    assert not {object_set(item.scene) for item in train} & {object_set(item.scene) for item in held_out}
    train_goals = {item.goal for item in train if item.goal is not None}
    held_out_goals = {item.goal for item in held_out if item.goal is not None}
    assert len(held_out_goals) > 50 and not train_goals & held_out_goals
    assert {goal_split(goal) for goal in held_out_goals} == {"held_out"}
    # Every held-out goal is a new combination of a subject, a relation and a reference that training goals show.
    descriptions = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    goals = [
        Goal(*parts) for parts in itertools.product(descriptions, RELATIONS, descriptions) if parts[0] != parts[2]
    ]
    for part in ("subject", "relation", "reference"):
        for split in ("held_out", "train"):
            assert {getattr(goal, part) for goal in goals if goal_split(goal) == split} == {
                getattr(goal, part) for goal in goals
            }
    # Moving objects keeps a scene in its split.
    for item in held_out[:50]:
        assert scene_split(Scene(tuple(reversed(item.scene.objects)))) == "held_out"
