"""
A toy embodied world for PaLM-E's tasks: a few coloured shapes on a grid, their state as numbers, questions whose
answers need the geometry, short manipulation plans toward a goal, and the scripted low-level policy that executes
them.

A scene puts two to four objects on a `GRID_SIZE` x `GRID_SIZE` grid, one object a cell. Each object has a shape and
a colour of `palme_hf.synthetic_shapes` (no two objects share both), a size of `SIZE_FRACTIONS` (no two share one, so
one object is the largest) and a cell, its column (0 at the left) and row (0 at the top). The objects are referred to
as `obj_1`, `obj_2`, ... in the order of `Scene.objects` (the paper's entity referrals). `render` draws a scene with
the synthetic-shapes renderer, `object_vectors` and `state_vector` give its state as numbers.

Relations compare cells: A is "left of" B when A's column is smaller, "right of" when it is larger, "above" when A's
row is smaller, "below" when it is larger (objects in one column are neither left nor right of each other).

The action language has one kind of step, `move obj_N DIRECTION`, which moves object N one cell left, right, up or
down; a plan numbers its steps, `1. move obj_2 right 2. move obj_2 up`. `execute` is the scripted policy that runs one
step (a step it cannot run is a `ValueError`), `oracle_plan` the shortest plan that moves a goal's object until the
goal holds.

`EmbodiedTaskDataset` draws `(scene, prompt, answer)` examples of `TASKS` from its split, seed and index alone. The
scenes (by the shapes, colours and sizes of their objects) and the goals are each split in two by a hash
(`scene_split`, `goal_split`): the `"held_out"` examples' scenes and goals never appear in `"train"` examples, of any
seed.
"""

import hashlib
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch.utils.data import Dataset

from .synthetic_shapes import COLOURS, SHAPES, ShapeSpec, check_split, draw_scene

GRID_SIZE = 4
MIN_OBJECTS, MAX_OBJECTS = 2, 4
# The side of an object's bounding box, as a fraction of a cell's width: four sizes, for up to four objects.
SIZE_FRACTIONS = {"tiny": 0.35, "small": 0.55, "medium": 0.75, "large": 0.95}
# direction -> (column change, row change)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("relation", "size", "referral", "plan", "next_step")
# One set of objects in HELD_OUT_EVERY is held out, and one goal in HELD_OUT_EVERY.
HELD_OUT_EVERY = 8
STEP_PATTERN = re.compile(rf"move obj_(\d+) ({'|'.join(DIRECTIONS)})")
ACTION_GRAMMAR = f"'move obj_N DIRECTION' with DIRECTION one of {', '.join(DIRECTIONS)}"

# Per-object vector: x and y of the centre and side of the bounding box (fractions of the image width), then the
# colour and the shape one-hot, in the order of COLOURS and SHAPES.
OBJECT_DIM = 3 + len(COLOURS) + len(SHAPES)
# State vector: MAX_OBJECTS slots of a presence flag (1.0 for an object, 0.0 for an empty slot) and the object vector.
STATE_DIM = MAX_OBJECTS * (1 + OBJECT_DIM)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its shape, colour and size (names of `SHAPES`, `COLOURS` and `SIZE_FRACTIONS`) and its
    cell (`column` 0 at the left, `row` 0 at the top)."""

    shape: str
    colour: str
    size: str
    column: int
    row: int

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, tuple(SIZE_FRACTIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"SceneObject: `{name}` must be one of {allowed}, got {value!r}.")
        for name, value in (("column", self.column), ("row", self.row)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID_SIZE:
                raise ValueError(f"SceneObject: `{name}` must be an integer from 0 to {GRID_SIZE - 1}, got {value!r}.")

    @property
    def description(self) -> str:
        """How goals name the object, e.g. `"red circle"`."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """
    The objects on the grid, `obj_1` first. Each has its own cell, its own size and its own (colour, shape).

    Args:
        objects (`tuple[SceneObject, ...]`): one to `MAX_OBJECTS` objects (a list is taken as a tuple).
    """

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= MAX_OBJECTS or not all(isinstance(item, SceneObject) for item in objects):
            raise ValueError(f"Scene: `objects` must be 1 to {MAX_OBJECTS} SceneObjects, got {objects!r}.")
        for name, key in (
            ("cell", lambda item: (item.column, item.row)),
            ("size", lambda item: item.size),
            ("colour and shape", lambda item: item.description),
        ):
            values = [key(item) for item in objects]
            if len(set(values)) != len(values):
                raise ValueError(f"Scene: two objects share a {name}, in {values}; each must have its own.")


@dataclass(frozen=True)
class Goal:
    """
    "Put the `subject` `relation` the `reference`": the object described `subject` (e.g. `"red circle"`) is to stand in
    `relation` (one of `RELATIONS`) to the object described `reference`. A goal names objects by colour and shape, so
    one goal applies to every scene that holds both.
    """

    subject: str
    relation: str
    reference: str

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"Goal: `relation` must be one of {RELATIONS}, got {self.relation!r}.")
        if self.subject == self.reference:
            raise ValueError(f"Goal: the subject and the reference must be two objects, got {self.subject!r} twice.")

    @property
    def text(self) -> str:
        """The goal in words, e.g. `"put the red circle right of the blue square"`."""
        return f"put the {self.subject} {self.relation} the {self.reference}"


def scene_from_json(value) -> Scene:
    """
    The scene of a JSON value (as `json.load` reads it): a list of objects, `obj_1` first, each an object with the keys
    `shape`, `colour`, `size`, `column` and `row`, e.g. `[{"shape": "circle", "colour": "red", "size": "small",
    "column": 0, "row": 1}]`. Anything else, a missing or unknown key, and a scene that breaks the rules of [`Scene`]
    are a `ValueError` that names it.
    """
    fields = ("shape", "colour", "size", "column", "row")
    if not isinstance(value, list):
        raise ValueError(f"A scene is a JSON list of objects, each with the keys {fields}; got {value!r}.")
    objects = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict) or set(item) != set(fields):
            raise ValueError(f"Object {number} of the scene must have exactly the keys {fields}, got {item!r}.")
        objects.append(SceneObject(**item))
    return Scene(tuple(objects))


def parse_goal(text: str) -> Goal:
    """
    The goal of its text, as [`Goal.text`] writes it: `"put the red circle right of the blue square"`. Text of another
    form, or naming a colour, shape or relation the world does not have, is a `ValueError` that names it.
    """
    description = rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})"
    match = re.fullmatch(rf"put the ({description}) ({'|'.join(RELATIONS)}) the ({description})", text.strip())
    if match is None:
        raise ValueError(
            f"Cannot read the goal {text!r}: a goal reads 'put the COLOUR SHAPE RELATION the COLOUR SHAPE', with a "
            f"COLOUR of {tuple(COLOURS)}, a SHAPE of {SHAPES} and a RELATION of {RELATIONS}."
        )
    return Goal(*match.groups())


@dataclass(frozen=True)
class TaskExample:
    """
    One example of a task: the `prompt` about `scene` and the `answer` computed from it. `goal` is the goal of the
    `"plan"` and `"next_step"` tasks, None for the questions.
    """

    task: str
    scene: Scene
    prompt: str
    answer: str
    goal: Goal | None = None


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draws `scene` with the synthetic-shapes renderer: an RGB image of `image_size` x `image_size` pixels (at least
    8 a cell), each object centred in its cell on a black background."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 * GRID_SIZE:
        raise ValueError(f"`image_size` must be an integer of at least {8 * GRID_SIZE} pixels, got {image_size!r}.")
    cell = image_size / GRID_SIZE
    shapes = [
        ShapeSpec(
            size=item.size,
            colour=item.colour,
            shape=item.shape,
            center_x=(item.column + 0.5) * cell,
            center_y=(item.row + 0.5) * cell,
            side=SIZE_FRACTIONS[item.size] * cell,
        )
        for item in scene.objects
    ]
    return draw_scene(shapes, image_size)


def object_vectors(scene: Scene) -> torch.Tensor:
    """
    The scene's objects as numbers, one row per object (`obj_1` first), of shape `(num_objects, OBJECT_DIM)`, float32:

    - 0, 1: x and y of the centre of the object, from the left and top edges, as fractions of the image's side;
    - 2: the side of its bounding box, as a fraction of the image's side;
    - 3 to 6: its colour, one-hot in the order of `COLOURS` (red, green, blue, yellow);
    - 7 to 9: its shape, one-hot in the order of `SHAPES` (circle, square, triangle).
    """
    vectors = torch.zeros(len(scene.objects), OBJECT_DIM)
    for index, item in enumerate(scene.objects):
        vectors[index, 0] = (item.column + 0.5) / GRID_SIZE
        vectors[index, 1] = (item.row + 0.5) / GRID_SIZE
        vectors[index, 2] = SIZE_FRACTIONS[item.size] / GRID_SIZE
        vectors[index, 3 + list(COLOURS).index(item.colour)] = 1.0
        vectors[index, 3 + len(COLOURS) + SHAPES.index(item.shape)] = 1.0
    return vectors


def state_vector(scene: Scene) -> torch.Tensor:
    """
    The whole scene as one vector of fixed width, shape `(STATE_DIM,)`, float32: `MAX_OBJECTS` slots of
    `1 + OBJECT_DIM` values, slot i for `obj_{i+1}`, each a presence flag (1.0) followed by the object's row of
    [`object_vectors`]. The slots of a scene with fewer objects are zeros.
    """
    slots = torch.zeros(MAX_OBJECTS, 1 + OBJECT_DIM)
    slots[: len(scene.objects), 0] = 1.0
    slots[: len(scene.objects), 1:] = object_vectors(scene)
    return slots.flatten()


def cells_in_relation(cell: tuple[int, int], relation: str, other_cell: tuple[int, int]) -> bool:
    """Whether an object in `cell` is `relation` (one of `RELATIONS`) an object in `other_cell` (`(column, row)`)."""
    (column, row), (other_column, other_row) = cell, other_cell
    if relation == "left of":
        return column < other_column
    if relation == "right of":
        return column > other_column
    if relation == "above":
        return row < other_row
    if relation == "below":
        return row > other_row
    raise ValueError(f"`relation` must be one of {RELATIONS}, got {relation!r}.")


def relation_holds(scene: Scene, first: int, relation: str, second: int) -> bool:
    """Whether `obj_{first}` is `relation` (one of `RELATIONS`) `obj_{second}` in `scene` (numbers from 1)."""
    subject, reference = scene.objects[first - 1], scene.objects[second - 1]
    return cells_in_relation((subject.column, subject.row), relation, (reference.column, reference.row))


def object_number(scene: Scene, description: str) -> int:
    """N of the `obj_N` of `scene` described `description` (e.g. `"red circle"`); a `ValueError` when it has none."""
    descriptions = [item.description for item in scene.objects]
    if description not in descriptions:
        raise ValueError(f"The scene has no {description!r}: its objects are {descriptions}.")
    return descriptions.index(description) + 1


def goal_holds(scene: Scene, goal: Goal) -> bool:
    """Whether the goal's subject stands in its relation to its reference in `scene` (which must hold both)."""
    subject, reference = object_number(scene, goal.subject), object_number(scene, goal.reference)
    return relation_holds(scene, subject, goal.relation, reference)


def execute(scene: Scene, step: str) -> Scene:
    """
    The scripted low-level policy: the scene after one step of the action language, `move obj_N DIRECTION`, which
    moves `obj_N` one cell in DIRECTION (left, right, up or down). Whitespace around the step is left out. A step off
    the grammar, of an object the scene does not have, off the grid or into a taken cell is a `ValueError` that names
    it.
    """
    match = STEP_PATTERN.fullmatch(step.strip()) if isinstance(step, str) else None
    if match is None:
        raise ValueError(f"Cannot execute {step!r}: a step is {ACTION_GRAMMAR}.")
    number, direction = int(match.group(1)), match.group(2)
    if not 1 <= number <= len(scene.objects):
        raise ValueError(f"Cannot execute {step!r}: the scene has obj_1 to obj_{len(scene.objects)}.")
    moved = scene.objects[number - 1]
    column_change, row_change = DIRECTIONS[direction]
    column, row = moved.column + column_change, moved.row + row_change
    if not (0 <= column < GRID_SIZE and 0 <= row < GRID_SIZE):
        raise ValueError(f"Cannot execute {step!r}: it moves obj_{number} off the grid.")
    for other_number, other in enumerate(scene.objects, start=1):
        if (other.column, other.row) == (column, row):
            raise ValueError(f"Cannot execute {step!r}: the cell is taken by obj_{other_number}.")
    objects = list(scene.objects)
    objects[number - 1] = replace(moved, column=column, row=row)
    return Scene(tuple(objects))


def format_plan(steps: list[str]) -> str:
    """A plan's text: its steps numbered from 1, `"1. move obj_1 right 2. move obj_1 up"` (no steps: `""`)."""
    return " ".join(f"{number}. {step}" for number, step in enumerate(steps, start=1))


def parse_plan(plan: str) -> list[str]:
    """The steps of a plan's text (see [`format_plan`]); text that is not steps numbered 1, 2, ... in order is a
    `ValueError`. The steps themselves are checked when executed."""
    pieces = re.split(r"(?:^|\s+)(\d+)\.\s+", plan.strip())
    numbers = [int(number) for number in pieces[1::2]]
    if pieces[0] or numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"Cannot read the plan {plan!r}: a plan is steps numbered from 1, '1. STEP 2. STEP ...'.")
    return pieces[2::2]


def plan_succeeds(scene: Scene, goal: Goal, plan: str) -> bool:
    """Whether executing the plan's text step by step makes `goal` hold: a plan that cannot be read, or a step that
    cannot be executed, fails."""
    try:
        for step in parse_plan(plan):
            scene = execute(scene, step)
    except ValueError:
        return False
    return goal_holds(scene, goal)


def _shortest_path(scene: Scene, goal: Goal) -> list[str] | None:
    """The steps of the shortest plan that moves the goal's subject alone, around the other objects, until the goal
    holds (ties broken in the order of `DIRECTIONS`); `[]` when it holds already, None when no plan does it."""
    number = object_number(scene, goal.subject)
    reference = scene.objects[object_number(scene, goal.reference) - 1]
    subject = scene.objects[number - 1]
    taken = {(item.column, item.row) for item in scene.objects}
    start = (subject.column, subject.row)
    steps_to = {start: []}
    frontier = deque([start])
    while frontier:
        cell = frontier.popleft()
        if cells_in_relation(cell, goal.relation, (reference.column, reference.row)):
            return steps_to[cell]
        for direction, (column_change, row_change) in DIRECTIONS.items():
            column, row = cell[0] + column_change, cell[1] + row_change
            on_grid = 0 <= column < GRID_SIZE and 0 <= row < GRID_SIZE
            if on_grid and (column, row) not in taken and (column, row) not in steps_to:
                steps_to[(column, row)] = steps_to[cell] + [f"move obj_{number} {direction}"]
                frontier.append((column, row))
    return None


def oracle_plan(scene: Scene, goal: Goal) -> list[str]:
    """
    The reference plan for `goal` (the training target): the steps of the shortest plan that moves the goal's subject
    alone, around the other objects, until the goal holds, ties broken in the order of `DIRECTIONS` (left, right, up,
    down). `[]` when the goal holds already; a `ValueError` when no cell the subject can reach makes the goal hold (the
    other objects wall it in, or the reference is at the grid's edge).
    """
    steps = _shortest_path(scene, goal)
    if steps is None:
        raise ValueError(
            f"No plan reaches {goal.text!r}: no cell that the {goal.subject} can reach is {goal.relation} the "
            f"{goal.reference}."
        )
    return steps


def _split_of(key: str) -> str:
    """`"held_out"` for one key in `HELD_OUT_EVERY` (by its SHA-256, the same on every run), else `"train"`."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "held_out" if int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0 else "train"


def scene_split(scene: Scene) -> str:
    """
    The split a scene belongs to, `"train"` or `"held_out"` (one set of objects in `HELD_OUT_EVERY`), by the shapes,
    colours and sizes of its objects, whatever their cells and numbering: executing steps keeps a scene in its split.
    """
    objects = sorted(f"{item.shape},{item.colour},{item.size}" for item in scene.objects)
    return _split_of(";".join(objects))


def goal_split(goal: Goal) -> str:
    """The split a goal belongs to, `"train"` or `"held_out"` (one goal in `HELD_OUT_EVERY`), by its text."""
    return _split_of(goal.text)


def sample_scene(rng: random.Random, split: str) -> Scene:
    """A scene of `split`, drawn from `rng`: `MIN_OBJECTS` to `MAX_OBJECTS` objects in random cells, each of its own
    (colour, shape) and size, numbered in random order."""
    check_split(split)
    kinds = [(shape, colour) for colour in COLOURS for shape in SHAPES]
    while True:
        num_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        cells = rng.sample(range(GRID_SIZE * GRID_SIZE), num_objects)
        objects = zip(cells, rng.sample(kinds, num_objects), rng.sample(list(SIZE_FRACTIONS), num_objects))
        scene = Scene(
            tuple(
                SceneObject(shape, colour, size, column=cell % GRID_SIZE, row=cell // GRID_SIZE)
                for cell, (shape, colour), size in objects
            )
        )
        if scene_split(scene) == split:
            return scene


def open_goals(scene: Scene, split: str) -> list[Goal]:
    """The goals of `split` about two objects of `scene` that do not hold yet and that moving their subject reaches."""
    check_split(split)
    goals = [
        Goal(subject.description, relation, reference.description)
        for subject in scene.objects
        for reference in scene.objects
        if subject != reference
        for relation in RELATIONS
    ]
    # A plan of no steps: the goal holds already; None: no plan reaches it.
    return [goal for goal in goals if goal_split(goal) == split and _shortest_path(scene, goal)]


def sample_scene_and_goal(rng: random.Random, split: str) -> tuple[Scene, Goal]:
    """A scene of `split` and one of its [`open_goals`], drawn from `rng` (scenes without one are drawn again)."""
    while True:
        scene = sample_scene(rng, split)
        goals = open_goals(scene, split)
        if goals:
            return scene, rng.choice(goals)


def refused_steps(scene: Scene, number: int) -> list[str]:
    """The steps of `obj_{number}` that the scripted policy refuses on `scene` ([`execute`]): off the grid or into a
    taken cell, in the order of `DIRECTIONS`."""
    steps = []
    for direction in DIRECTIONS:
        step = f"move obj_{number} {direction}"
        try:
            execute(scene, step)
        except ValueError:
            steps.append(step)
    return steps


def next_step_prompt(goal: Goal, refused: Sequence[str] = ()) -> str:
    """
    The prompt of the `"next_step"` task, the closed loop's question: `"Q: What is the next step to put the red circle
    right of the blue square? A:"`, after the steps the policy refused on this scene, each followed by `failed`:
    `"move obj_2 right failed Q: What is the next step to ... ? A:"`.
    """
    return " ".join([*(f"{step.strip()} failed" for step in refused), f"Q: What is the next step to {goal.text}? A:"])


def sample_example(rng: random.Random, split: str, task: str) -> TaskExample:
    """
    An example of `task` (one of `TASKS`) on a scene of `split` drawn from `rng`; the `"plan"` and `"next_step"` goals
    are of `split` too. The prompts and answers:

    - `"relation"`: `"Q: Is obj_2 left of obj_1? A:"`, `"yes"` or `"no"` (as often one as the other);
    - `"size"`: `"Q: Which object is largest? A:"` (or smallest), `"obj_3"`;
    - `"referral"`: `"Q: Which object is the red circle? A:"`, `"obj_2"`;
    - `"plan"`: `"Q: How to put the red circle right of the blue square? A:"`, the [`oracle_plan`] as text,
      `"1. move obj_2 right 2. move obj_2 right"`;
    - `"next_step"`: `"Q: What is the next step to put the red circle right of the blue square? A:"`, the first step
      of the oracle plan, `"move obj_2 right"`, on the scene after a random number of the oracle's steps toward the
      goal (the states a closed loop meets): the scene and the goal of the `"plan"` example of the same `rng`. The
      prompt first names each of the [`refused_steps`] of the goal's subject there, half of them at random (what the
      closed loop says after the policy refused a step; see [`next_step_prompt`]).
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    if task in ("plan", "next_step"):
        scene, goal = sample_scene_and_goal(rng, split)
        steps = oracle_plan(scene, goal)
        if task == "plan":
            return TaskExample(task, scene, f"Q: How to {goal.text}? A:", format_plan(steps), goal)
        for step in steps[: rng.randrange(len(steps))]:
            scene = execute(scene, step)
        # The steps the policy would refuse here, each named half the time, as the closed loop names a refused one.
        subject_steps = refused_steps(scene, object_number(scene, goal.subject))
        refused = [step for step in subject_steps if rng.random() < 0.5]
        return TaskExample(task, scene, next_step_prompt(goal, refused), oracle_plan(scene, goal)[0], goal)
    scene = sample_scene(rng, split)
    numbers = range(1, len(scene.objects) + 1)
    if task == "relation":
        wanted = rng.random() < 0.5
        # Two objects in different cells: some relation holds between them and some does not.
        questions = [
            (first, relation, second)
            for first in numbers
            for second in numbers
            if first != second
            for relation in RELATIONS
            if relation_holds(scene, first, relation, second) == wanted
        ]
        first, relation, second = rng.choice(questions)
        return TaskExample(task, scene, f"Q: Is obj_{first} {relation} obj_{second}? A:", "yes" if wanted else "no")
    if task == "size":
        extreme = rng.choice(("largest", "smallest"))
        pick = max if extreme == "largest" else min
        number = pick(numbers, key=lambda candidate: SIZE_FRACTIONS[scene.objects[candidate - 1].size])
        return TaskExample(task, scene, f"Q: Which object is {extreme}? A:", f"obj_{number}")
    number = rng.choice(numbers)
    prompt = f"Q: Which object is the {scene.objects[number - 1].description}? A:"
    return TaskExample(task, scene, prompt, f"obj_{number}")


class EmbodiedTaskDataset(Dataset):
    """
    `num_samples` [`TaskExample`]s of a split: item `index` is an example of `tasks[index % len(tasks)]` drawn from
    `(seed, split, index)` alone (see [`sample_example`]). The scenes and goals of `"held_out"` items never appear in
    `"train"` items, whatever the seeds.

    Args:
        num_samples (`int`): length of the dataset.
        split (`str`, defaults to `"train"`): `"train"` or `"held_out"`.
        seed (`int`, defaults to 0): the dataset's seed.
        tasks (`tuple[str, ...]`, defaults to `TASKS`): the task kinds, each of `TASKS` once at most, taken in turn.
    """

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, tasks: tuple[str, ...] = TASKS):
        check_split(split)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"`num_samples` must be an integer >= 0, got {num_samples!r}.")
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(TASKS):
            raise ValueError(f"`tasks` must be distinct names of {TASKS}, got {tasks!r}.")
        self.num_samples = num_samples
        self.split = split
        self.seed = seed
        self.tasks = tasks

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> TaskExample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a dataset of {self.num_samples} samples.")
        # A string seed is hashed with SHA-512: the same on every run and platform.
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        return sample_example(rng, self.split, self.tasks[index % len(self.tasks)])


__all__ = [
    "DIRECTIONS",
    "EmbodiedTaskDataset",
    "GRID_SIZE",
    "Goal",
    "HELD_OUT_EVERY",
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "OBJECT_DIM",
    "RELATIONS",
    "SIZE_FRACTIONS",
    "STATE_DIM",
    "Scene",
    "SceneObject",
    "TASKS",
    "TaskExample",
    "cells_in_relation",
    "execute",
    "format_plan",
    "goal_holds",
    "goal_split",
    "object_number",
    "next_step_prompt",
    "object_vectors",
    "open_goals",
    "oracle_plan",
    "parse_goal",
    "parse_plan",
    "plan_succeeds",
    "refused_steps",
    "relation_holds",
    "render",
    "sample_example",
    "sample_scene",
    "sample_scene_and_goal",
    "scene_from_json",
    "scene_split",
    "state_vector",
]
