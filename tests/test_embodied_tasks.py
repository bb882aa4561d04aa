"""palme_hf.embodied_tasks: the embodied world's tokenizer, multimodal sentences and training batches, the scores of
answers on held-out examples (the oracle's are all right, wrong ones are not), and the closed loop."""

import re

import pytest
import torch

from palme_hf.embodied_tasks import (
    INPUT_CHOICES,
    EmbodiedCollator,
    build_embodied_tokenizer,
    encode_sentences,
    episode_strip,
    evaluate_embodied,
    generate_answers,
    model_next_step,
    run_episode,
    score_answers,
    step_is_right,
)
from palme_hf.embodied_world import (
    OBJECT_DIM,
    STATE_DIM,
    EmbodiedTaskDataset,
    Goal,
    Scene,
    SceneObject,
    execute,
    oracle_plan,
)

from helpers import load_script

# obj_1 a small red circle at column 0, obj_2 a large blue square at column 2, both in row 1
SCENE = Scene(
    (SceneObject("circle", "red", "small", column=0, row=1), SceneObject("square", "blue", "large", column=2, row=1))
)
GOAL = Goal("red circle", "right of", "blue square")


def oracle(examples):
    return [example.answer for example in examples]


@pytest.fixture(scope="module")
def tiny():
    """A new tiny model of examples/train_embodied.py's architecture, and its processor."""
    train_embodied = load_script("examples", "train_embodied.py")
    args = train_embodied.parse_args(["--image-size", "32", "--hidden-size", "32", "--num-layers", "1"])
    return train_embodied.new_model(args)


def test_the_tokenizer_splits_question_marks_and_colons_and_knows_every_word():
    tokenizer = build_embodied_tokenizer()
    assert tokenizer.tokenize("Q: Is obj_2 left of obj_1? A:") == [
        "Q", ":", "Is", "obj_2", "left", "of", "obj_1", "?", "A", ":"
    ]  # fmt: skip
    dataset = EmbodiedTaskDataset(500, "train")
    for index in range(len(dataset)):
        example = dataset[index]
        ids = tokenizer(f"{example.prompt} {example.answer}")["input_ids"]
        assert tokenizer.unk_token_id not in ids, example
        assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer("1. move obj_2 right", add_special_tokens=False)["input_ids"]) == (
        "1. move obj_2 right"
    )


@pytest.mark.parametrize("inputs", list(INPUT_CHOICES))
def test_a_batch_holds_the_observations_of_its_inputs_and_labels_only_the_answers(tiny, inputs):
    _, processor = tiny
    examples = [EmbodiedTaskDataset(10, "train")[index] for index in range(5)]
    batch = EmbodiedCollator(processor, INPUT_CHOICES[inputs])(examples)
    observations = INPUT_CHOICES[inputs]
    assert ("pixel_values" in batch) == ("image" in observations)
    assert ("state_values" in batch) == ("state" in observations)
    assert ("object_values" in batch) == ("objects" in observations)
    if "state" in observations:
        assert batch["state_values"].shape == (5, STATE_DIM)
    if "objects" in observations:
        assert batch["object_values"].shape == (sum(len(example.scene.objects) for example in examples), OBJECT_DIM)
    tokenizer = processor.tokenizer
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]) == example.answer
        assert batch["attention_mask"][row].sum() == (batch["input_ids"][row] != tokenizer.pad_token_id).sum()


def test_a_sentence_puts_the_observations_before_the_prompt(tiny):
    _, processor = tiny
    encoded = encode_sentences(processor, [SCENE], ["Q: Which object is largest? A:"], ("image", "state", "objects"))
    tokens = processor.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    num_image_tokens = processor.num_image_tokens
    assert tokens[: 1 + num_image_tokens] == ["<bos>", *["<image>"] * num_image_tokens]
    rest = tokens[1 + num_image_tokens :]
    assert processor.num_state_tokens == 4  # one embedding per object slot, the script's default
    assert rest == [
        "<state>", "<state>", "<state>", "<state>", "obj_1", ":", "<obj>", "obj_2", ":", "<obj>",
        "Q", ":", "Which", "object", "is", "largest", "?", "A", ":",
    ]  # fmt: skip
    torch.testing.assert_close(encoded["object_values"][1, 3:7], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # blue


@pytest.mark.parametrize("inputs", [(), ("image", "image"), ("sound",)])
def test_refuses_inputs_that_are_not_observations(tiny, inputs):
    _, processor = tiny
    with pytest.raises(ValueError, match="`inputs` must be distinct names of"):
        encode_sentences(processor, [SCENE], ["Q: Which object is largest? A:"], inputs)


def test_the_oracle_scores_one_and_wrong_answers_score_less():
    examples = [EmbodiedTaskDataset(100, "held_out", seed=3)[index] for index in range(100)]
    perfect = evaluate_embodied(oracle, examples)
    assert perfect == {
        "relation_accuracy": 1.0,
        "size_accuracy": 1.0,
        "referral_accuracy": 1.0,
        "question_accuracy": 1.0,
        "plan_success": 1.0,
        "next_step_accuracy": 1.0,
        "next_step_subject_accuracy": 1.0,
        "num_examples": 100,
    }
    # every answer of another example: right only by chance
    shifted = evaluate_embodied(lambda batch: oracle(batch[5:] + batch[:5]), examples)
    assert all(shifted[name] < 0.7 for name in perfect if name != "num_examples")
    # plans that stop one step short, and "no" to every relation question
    short = [
        " ".join(example.answer.split()[:-4]) if example.task == "plan" else example.answer for example in examples
    ]
    assert score_answers(examples, short)["plan_success"] < 0.5
    negative = [("no" if example.task == "relation" else example.answer) for example in examples]
    assert 0.3 < score_answers(examples, negative)["relation_accuracy"] < 0.7
    with pytest.raises(ValueError, match="Got 99 answers for 100 examples"):
        score_answers(examples, negative[:-1])
    # next steps that move the goal's subject the wrong way: the subject is right, the step is not
    backwards = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong_way = [
        " ".join([*example.answer.split()[:2], backwards[example.answer.split()[2]]])
        if example.task == "next_step"
        else example.answer
        for example in examples
    ]
    scores = score_answers(examples, wrong_way)
    assert scores["next_step_subject_accuracy"] == 1.0 and scores["next_step_accuracy"] == 0.0
    other_object = [  # obj_N becomes obj_(N+1), obj_4 becomes obj_1
        re.sub(r"obj_(\d)", lambda match: f"obj_{int(match[1]) % 4 + 1}", example.answer) for example in examples
    ]
    assert score_answers(examples, other_object)["next_step_subject_accuracy"] == 0.0


def test_a_next_step_is_right_when_it_starts_a_shortest_plan():
    assert oracle_plan(SCENE, GOAL)[0] == "move obj_1 right"
    assert step_is_right(SCENE, GOAL, "move obj_1 right")
    assert step_is_right(SCENE, GOAL, "move obj_1 up")  # around the square from above: as short
    assert step_is_right(SCENE, GOAL, "move obj_1 down")  # or from below
    assert not step_is_right(SCENE, GOAL, "move obj_1 left")  # off the grid
    assert not step_is_right(execute(SCENE, "move obj_1 right"), GOAL, "move obj_1 left")  # back
    assert not step_is_right(SCENE, GOAL, "walk obj_1 right")
    assert not step_is_right(SCENE, GOAL, "move obj_2 right")  # the square at the edge: nothing is right of it
    assert not step_is_right(execute(SCENE, "move obj_2 right"), GOAL, "move obj_2 down")  # still at the edge


def oracle_step(scene, goal, refused):
    return oracle_plan(scene, goal)[0]


def test_the_closed_loop_ends_when_the_goal_holds_or_the_budget_is_spent():
    episode = run_episode(oracle_step, SCENE, GOAL, max_steps=10)
    assert episode.success and len(episode.steps) == 4 and len(episode.scenes) == 5
    assert episode.steps[0] == "move obj_1 right" and episode.scenes[-1].objects[0].column == 3
    assert episode.refused == (False,) * 4
    # two steps down to the bottom row, then the policy refuses the step off the grid until the budget is spent
    wandering = run_episode(lambda scene, goal, refused: "move obj_2 down", SCENE, GOAL, max_steps=10)
    assert not wandering.success and wandering.steps == ("move obj_2 down",) * 10
    assert wandering.refused == (False,) * 2 + (True,) * 8 and len(wandering.scenes) == 11
    assert all(scene == wandering.scenes[2] for scene in wandering.scenes[3:])  # a refused step leaves the scene
    with pytest.raises(ValueError, match="`max_steps` must be an integer >= 0"):
        run_episode(oracle_step, SCENE, GOAL, max_steps=-1)


def test_the_closed_loop_names_the_refused_steps_until_one_is_executed():
    asked = []

    def next_step(scene, goal, refused):
        asked.append(refused)
        if scene == SCENE:
            return ["move obj_1 left", "walk obj_1", "move obj_1 up"][len(refused)]
        return oracle_step(scene, goal, refused)

    episode = run_episode(next_step, SCENE, GOAL, max_steps=6)
    # off the grid, then off the grammar: both refused and named; the step up is executed, and the list starts anew
    assert asked == [(), ("move obj_1 left",), ("move obj_1 left", "walk obj_1"), (), (), ()]
    assert episode.refused == (True, True, False, False, False, False) and episode.success
    assert episode.scenes[1] == episode.scenes[2] == SCENE and episode.scenes[3].objects[0].row == 0
    strict = run_episode(next_step, SCENE, GOAL, max_steps=6, replan=False)
    assert strict.steps == ("move obj_1 left",) and strict.refused == (True,) and not strict.success
    assert len(strict.scenes) == 2
    strip = episode_strip(episode, image_size=64)
    assert strip.width == 7 * (64 + 8) + 8 and strip.height > 64


def test_a_model_answers_and_steps_through_its_generation(tiny):
    model, processor = tiny
    answers = generate_answers(
        model, processor, ("image", "state"), [SCENE, SCENE], ["Q: Which object is largest? A:"] * 2
    )
    assert len(answers) == 2 and answers[0] == answers[1]  # left-padded batches of equal prompts agree
    episode = run_episode(model_next_step(model, processor, ("objects",)), SCENE, GOAL, max_steps=2)
    assert 1 <= len(episode.steps) <= 2
