"""
The embodied world's tasks for a PalmE: the word-level tokenizer of the world's vocabulary, the multimodal sentences
that put a scene's observations (image, state vector, object vectors) before a task's prompt, training batches,
greedy answers by `generate()`, their scores on held-out examples, and the closed loop in which a model's next step is
executed by the scripted policy and the new observation, or the step the policy refused, goes back into the sentence.

A multimodal sentence holds the observations `inputs` names (a tuple of `OBSERVATIONS`), then the prompt:

- `"image"`: `"<image>"`, the scene as rendered;
- `"state"`: `"<state>"`, the scene's `state_vector`;
- `"objects"`: `"obj_1 : <obj> obj_2 : <obj> ..."`, one `object_vectors` row per object (the paper's entity
  referrals);

so that `("image", "state")` gives `"<image> <state> Q: Is obj_2 left of obj_1? A:"`.
"""

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .captioning import generate_greedy_texts
from .embodied_world import (
    DIRECTIONS,
    GRID_SIZE,
    MAX_OBJECTS,
    RELATIONS,
    SIZE_FRACTIONS,
    Goal,
    Scene,
    TaskExample,
    execute,
    goal_holds,
    next_step_prompt,
    object_number,
    object_vectors,
    oracle_plan,
    plan_succeeds,
    render,
    state_vector,
)
from .io_palme import load_saved_model, load_saved_processor, read_json_object, write_bytes_file
from .model_card_palme import EVAL_RESULTS_FILE
from .modeling_palme import PalmEForConditionalGeneration
from .processing_palme import PalmEProcessor
from .synthetic_shapes import COLOURS, SHAPES, build_word_level_tokenizer

OBSERVATIONS = ("image", "state", "objects")
# The observations of the sentences, by the name `--inputs` gives them.
INPUT_CHOICES = {
    "image": ("image",),
    "state": ("state",),
    "objects": ("objects",),
    "image+state": ("image", "state"),
}
QUESTION_TASKS = ("relation", "size", "referral")
# The longest plan the tokenizer numbers: an oracle plan walks around at most three objects on the grid.
MAX_PLAN_STEPS = 3 * GRID_SIZE
# "N. move obj_K DIRECTION" is four words a step; and <eos>.
MAX_ANSWER_TOKENS = 4 * MAX_PLAN_STEPS + 1
PROMPT_WORDS = (
    "Q", ":", "A", "?", "Is", "Which", "object", "is", "largest", "smallest", "the", "How", "What", "next", "step",
    "to", "put", "move", "yes", "no",
)  # fmt: skip
EMBODIED_WORDS = tuple(
    dict.fromkeys(
        [
            *PROMPT_WORDS,
            *(word for relation in RELATIONS for word in relation.split()),
            *DIRECTIONS,
            *COLOURS,
            *SHAPES,
            *SIZE_FRACTIONS,
            *(f"obj_{number}" for number in range(1, MAX_OBJECTS + 1)),
            *(f"{number}." for number in range(1, MAX_PLAN_STEPS + 1)),
            "failed",
        ]
    )
)


def build_embodied_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """
    A word-level tokenizer of the embodied world's prompts and answers (`tokenizers` WordLevel model): ids 0 to 3 are
    `<pad>`, `<bos>`, `<eos>`, `<unk>`, then `EMBODIED_WORDS`. Words are split at whitespace, and `?` and `:` are words
    of their own (`"obj_1?"` is `obj_1`, `?`). Encoding prepends `<bos>`; `<eos>` ends an answer. `padding_side="left"`
    suits batched generation.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?:]"), behavior="isolated")]
    )
    return build_word_level_tokenizer(EMBODIED_WORDS, pre_tokenizer, padding_side)


def check_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    """`inputs` as a tuple of distinct names of `OBSERVATIONS`; anything else is a `ValueError`."""
    inputs = tuple(inputs)
    if not inputs or len(set(inputs)) != len(inputs) or not set(inputs) <= set(OBSERVATIONS):
        raise ValueError(f"`inputs` must be distinct names of {OBSERVATIONS}, got {inputs!r}.")
    return inputs


def encode_sentences(
    processor: PalmEProcessor,
    scenes: Sequence[Scene],
    prompts: Sequence[str],
    inputs: Sequence[str],
    **kwargs,
):
    """
    The processor's encoding of one multimodal sentence per scene: the observations of `inputs` (see the module) of
    `scenes[i]`, then `prompts[i]`. `kwargs` go to the processor (`return_tensors`, `padding`, ...).
    """
    inputs = check_inputs(inputs)
    if len(scenes) != len(prompts):
        raise ValueError(f"Got {len(scenes)} scenes for {len(prompts)} prompts: give one scene per prompt.")
    texts = []
    for scene, prompt in zip(scenes, prompts):
        markers = []
        if "image" in inputs:
            markers.append(processor.image_token)
        if "state" in inputs:
            markers.append(processor.state_token)
        if "objects" in inputs:
            markers += [f"obj_{number} : {processor.object_token}" for number in range(1, len(scene.objects) + 1)]
        texts.append(" ".join([*markers, prompt]))
    image_size = processor.image_processor.size["height"]
    return processor(
        images=[render(scene, image_size) for scene in scenes] if "image" in inputs else None,
        text=texts,
        states=torch.stack([state_vector(scene) for scene in scenes]) if "state" in inputs else None,
        objects=torch.cat([object_vectors(scene) for scene in scenes]) if "objects" in inputs else None,
        **kwargs,
    )


class EmbodiedCollator:
    """
    Batches [`TaskExample`]s for training with the language-model loss: each example's multimodal sentence (see
    [`encode_sentences`]) followed by its answer and `<eos>`, right-padded, with `labels` -100 but on the answer and
    `<eos>`. Returns `input_ids`, `attention_mask`, `labels` and the observations' `pixel_values`, `state_values` and
    `object_values` as `inputs` has them.

    Args:
        processor ([`PalmEProcessor`]): built for a model that takes the observations of `inputs`, its tokenizer of
            [`build_embodied_tokenizer`].
        inputs (`tuple[str, ...]`): the observations, names of `OBSERVATIONS`.
    """

    def __init__(self, processor: PalmEProcessor, inputs: Sequence[str]):
        self.processor = processor
        self.inputs = check_inputs(inputs)

    def __call__(self, examples: list[TaskExample]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        prompts = [f"{example.prompt} {example.answer}" for example in examples]
        encoded = encode_sentences(
            self.processor, [example.scene for example in examples], prompts, self.inputs, return_tensors=None
        )
        sequences = [ids + [tokenizer.eos_token_id] for ids in encoded["input_ids"]]
        answer_lengths = [
            len(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) + 1 for example in examples
        ]
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for row, (ids, answer_length) in enumerate(zip(sequences, answer_lengths)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, len(ids) - answer_length : len(ids)] = input_ids[row, len(ids) - answer_length : len(ids)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "pixel_values" in encoded:
            batch["pixel_values"] = torch.from_numpy(np.stack(encoded["pixel_values"]))
        for name in ("state_values", "object_values"):
            if name in encoded:
                batch[name] = encoded[name]
        return batch


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: PalmEProcessor,
    inputs: Sequence[str],
    scenes: Sequence[Scene],
    prompts: Sequence[str],
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of `model` to `prompts` about `scenes`, from the observations of `inputs`, `batch_size` at a
    time (left-padded), stripped of surrounding whitespace."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_sentences(
            processor,
            scenes[start : start + batch_size],
            prompts[start : start + batch_size],
            inputs,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        answers.extend(generate_greedy_texts(model, processor, batch, MAX_ANSWER_TOKENS))
    return answers


def step_is_right(scene: Scene, goal: Goal, step: str) -> bool:
    """Whether `step` can be executed on `scene` and is the first step of a shortest plan toward `goal`: after it,
    the goal is one step nearer (a step that walls the goal's subject in, or moves the reference to the grid's edge,
    leaves no plan)."""
    try:
        return len(oracle_plan(execute(scene, step), goal)) == len(oracle_plan(scene, goal)) - 1
    except ValueError:
        return False


def answer_is_right(example: TaskExample, answer: str) -> bool:
    """Whether `answer` is right for `example`: a question's answer word for word, a plan that makes the goal hold when
    executed ([`plan_succeeds`]), a next step that is the first of a shortest plan ([`step_is_right`])."""
    if example.task == "plan":
        return plan_succeeds(example.scene, example.goal, answer)
    if example.task == "next_step":
        return step_is_right(example.scene, example.goal, answer)
    return answer.split() == example.answer.split()


def score_answers(examples: Sequence[TaskExample], answers: Sequence[str]) -> dict[str, float | int]:
    """
    The scores of `answers` to `examples`, each a fraction of the examples of its tasks that [`answer_is_right`]:
    `question_accuracy` (the `QUESTION_TASKS`: relation, size and referral questions together), `plan_success`,
    `next_step_accuracy`, and each question task's own accuracy (`relation_accuracy`, ...), for the tasks `examples`
    hold; `next_step_subject_accuracy` is the fraction of next steps that move the goal's subject, right or not (what
    a step that is not right got wrong: the object, or the direction); `num_examples` is their count.
    """
    if len(examples) != len(answers):
        raise ValueError(f"Got {len(answers)} answers for {len(examples)} examples: give one answer per example.")
    right = {}
    for example, answer in zip(examples, answers):
        right.setdefault(example.task, []).append(answer_is_right(example, answer))
        if example.task == "next_step":
            subject = f"obj_{object_number(example.scene, example.goal.subject)}"
            right.setdefault("next_step_subject", []).append(answer.split()[1:2] == [subject])
    groups = {f"{task}_accuracy": right[task] for task in QUESTION_TASKS if task in right}
    questions = [value for task in QUESTION_TASKS for value in right.get(task, [])]
    if questions:
        groups["question_accuracy"] = questions
    if "plan" in right:
        groups["plan_success"] = right["plan"]
    if "next_step" in right:
        groups["next_step_accuracy"] = right["next_step"]
        groups["next_step_subject_accuracy"] = right["next_step_subject"]
    scores = {name: sum(values) / len(values) for name, values in groups.items()}
    scores["num_examples"] = len(examples)
    return scores


def evaluate_embodied(
    answer: Callable[[list[TaskExample]], list[str]], examples: Sequence[TaskExample]
) -> dict[str, float | int]:
    """The [`score_answers`] of `answer(examples)`, the answers of a predictor (a model's [`model_answerer`], or the
    oracle's `lambda examples: [example.answer for example in examples]`)."""
    examples = list(examples)
    return score_answers(examples, answer(examples))


SCORE_NAMES = {
    "question_accuracy": "question accuracy (relation, size, referral)",
    "relation_accuracy": "relation accuracy",
    "size_accuracy": "size accuracy",
    "referral_accuracy": "referral accuracy",
    "plan_success": "plan success",
    "next_step_accuracy": "next-step accuracy",
    "next_step_subject_accuracy": "next steps that move the goal's subject",
}


def scores_table(scores: dict) -> str:
    """The scores of [`score_answers`] as a Markdown table."""
    rows = [f"| {name} | {scores[key]:.3f} |" for key, name in SCORE_NAMES.items() if key in scores]
    return "\n".join(["| score | value |", "| --- | --- |", *rows])


def model_answerer(
    model: PreTrainedModel, processor: PalmEProcessor, inputs: Sequence[str], batch_size: int = 64
) -> Callable[[list[TaskExample]], list[str]]:
    """The predictor that answers examples by [`generate_answers`] from the observations of `inputs`."""

    def answer(examples: list[TaskExample]) -> list[str]:
        scenes, prompts = [example.scene for example in examples], [example.prompt for example in examples]
        return generate_answers(model, processor, inputs, scenes, prompts, batch_size)

    return answer


def load_embodied_model(model_dir: str) -> tuple[PalmEForConditionalGeneration, PalmEProcessor, tuple[str, ...]]:
    """
    The model, processor and observations (a tuple of `OBSERVATIONS`) of a folder that `examples/train_embodied.py`
    saved: the observations are the `"inputs"` of its `eval_results.json` (a key of `INPUT_CHOICES`). A folder
    without them, or that does not load, is a `ValueError` naming it.
    """
    model = load_saved_model(PalmEForConditionalGeneration, model_dir)
    processor = load_saved_processor(PalmEProcessor, model_dir)
    path = os.path.join(model_dir, EVAL_RESULTS_FILE)
    saved = read_json_object(path) if os.path.isfile(path) else {}
    if saved.get("inputs") not in INPUT_CHOICES:
        raise ValueError(
            f'{path} does not name the observations the model was trained on: expected an "inputs" of '
            f"{list(INPUT_CHOICES)}, as examples/train_embodied.py saves it, got {saved.get('inputs')!r}."
        )
    return model.eval(), processor, INPUT_CHOICES[saved["inputs"]]


@dataclass(frozen=True)
class Episode:
    """
    One run of the closed loop toward `goal`: `scenes[0]` is the start, `scenes[i + 1]` the scene after `steps[i]`,
    the same scene when the policy refused the step (`refused[i]`). `success` says whether the goal held within the
    step budget.
    """

    goal: Goal
    scenes: tuple[Scene, ...]
    steps: tuple[str, ...]
    refused: tuple[bool, ...]
    success: bool


def run_episode(
    next_step: Callable[[Scene, Goal, tuple[str, ...]], str],
    scene: Scene,
    goal: Goal,
    max_steps: int,
    replan: bool = True,
) -> Episode:
    """
    The closed loop: `next_step(scene, goal, refused)` (a model's answer to [`next_step_prompt`] from the current
    observation) is executed by the scripted policy, the scene changes, and the loop asks again, until the goal holds
    or `max_steps` steps were taken. A step the policy refuses (off the grid, into a taken cell, off the grammar)
    leaves the scene as it was; `refused` holds the steps refused on the current scene, which the next question
    names: the model plans again, told what failed. With `replan=False` a refused step ends the episode instead.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"`max_steps` must be an integer >= 0, got {max_steps!r}.")
    scenes, steps, refused_flags, refused = [scene], [], [], []
    while not goal_holds(scenes[-1], goal) and len(steps) < max_steps:
        step = next_step(scenes[-1], goal, tuple(refused))
        steps.append(step)
        try:
            after = execute(scenes[-1], step)
        except ValueError:
            after = None
        refused_flags.append(after is None)
        if after is None:
            scenes.append(scenes[-1])
            refused.append(step)
            if not replan:
                break
        else:
            scenes.append(after)
            refused = []
    return Episode(goal, tuple(scenes), tuple(steps), tuple(refused_flags), goal_holds(scenes[-1], goal))


def model_next_step(
    model: PreTrainedModel, processor: PalmEProcessor, inputs: Sequence[str]
) -> Callable[[Scene, Goal, tuple[str, ...]], str]:
    """The next step that `model` answers from the observations of `inputs` of a scene and the steps refused on it,
    for [`run_episode`]."""

    def next_step(scene: Scene, goal: Goal, refused: tuple[str, ...] = ()) -> str:
        return generate_answers(model, processor, inputs, [scene], [next_step_prompt(goal, refused)])[0]

    return next_step


def save_episode_strip(episode: Episode, path: str):
    """Writes the [`episode_strip`] of `episode` to `path` as a PNG file (making its folder; a file already there is
    replaced, so check it first)."""
    buffer = io.BytesIO()
    episode_strip(episode).save(buffer, format="PNG")
    write_bytes_file(path, buffer.getvalue())


def episode_strip(episode: Episode, image_size: int = 128, caption_height: int = 36) -> Image.Image:
    """
    The episode as one image: its scenes from left to right, each rendered at `image_size` with the step taken from it
    written under it (the last scene: whether the goal holds), the goal written above.
    """
    num_frames = len(episode.scenes)
    heading = 20
    strip = Image.new("RGB", (num_frames * (image_size + 8) + 8, heading + image_size + caption_height + 8), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((8, 4), f"goal: {episode.goal.text}", fill="black")
    for index, scene in enumerate(episode.scenes):
        left = 8 + index * (image_size + 8)
        strip.paste(render(scene, image_size), (left, heading))
        if index < len(episode.steps):
            caption = f"{index + 1}. {episode.steps[index]}" + (" - refused" if episode.refused[index] else "")
        else:
            caption = "goal holds" if episode.success else "goal not reached"
        draw.text((left, heading + image_size + 6), caption, fill="black")
    return strip


__all__ = [
    "EMBODIED_WORDS",
    "INPUT_CHOICES",
    "MAX_ANSWER_TOKENS",
    "MAX_PLAN_STEPS",
    "OBSERVATIONS",
    "QUESTION_TASKS",
    "EmbodiedCollator",
    "Episode",
    "answer_is_right",
    "build_embodied_tokenizer",
    "check_inputs",
    "encode_sentences",
    "episode_strip",
    "evaluate_embodied",
    "generate_answers",
    "load_embodied_model",
    "model_answerer",
    "model_next_step",
    "run_episode",
    "save_episode_strip",
    "score_answers",
    "scores_table",
    "step_is_right",
]
