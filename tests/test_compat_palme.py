"""The shims of compat_palme.py behave alike on every supported Transformers release, and a folder saved under one end
of the range loads under the other, with palme_hf and with `trust_remote_code` where palme_hf is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText

from palme_hf import PalmEProcessor
from palme_hf.compat_palme import slice_logits_to_keep

from conftest import WITHOUT_PALME_HF
from helpers import tiny_inputs, tiny_model
from tiny_captioner import build_tokenizer
from tiny_captioner import tiny_config as captioner_config

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_slice_logits_to_keep_takes_the_positions_asked_for():
    hidden_states = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    torch.testing.assert_close(slice_logits_to_keep(hidden_states, 0), hidden_states)
    torch.testing.assert_close(slice_logits_to_keep(hidden_states, 2), hidden_states[:, 3:])
    torch.testing.assert_close(slice_logits_to_keep(hidden_states, torch.tensor([0, 4])), hidden_states[:, [0, 4]])
    per_sample = torch.tensor([[1, 2], [0, 4]])
    expected = torch.stack([hidden_states[0, [1, 2]], hidden_states[1, [0, 4]]])
    torch.testing.assert_close(slice_logits_to_keep(hidden_states, per_sample), expected)
    mask = torch.tensor([[True, False, False, False, True], [False, False, True, False, False]])
    expected = torch.stack([hidden_states[0, 0], hidden_states[0, 4], hidden_states[1, 2]])
    torch.testing.assert_close(slice_logits_to_keep(hidden_states, mask), expected)


def test_logits_to_keep_projects_only_the_last_positions():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        every_position = model(pixel_values=pixel_values, input_ids=input_ids).logits
        last_two = model(pixel_values=pixel_values, input_ids=input_ids, logits_to_keep=2).logits
    assert last_two.shape == (2, 2, every_position.shape[-1])
    torch.testing.assert_close(last_two, every_position[:, -2:])


def test_activation_checkpointing_names_of_the_newest_release():
    model = tiny_model().train()
    language_model, vision_model = model.model.language_model, model.model.vision_model
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert language_model.gradient_checkpointing and vision_model.gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not language_model.gradient_checkpointing and not vision_model.gradient_checkpointing


def test_processor_returns_tensors_by_default():
    tokenizer = build_tokenizer()
    processor = PalmEProcessor.from_model_config(captioner_config(len(tokenizer), cross_attend=False), tokenizer)
    inputs = processor(images=PIL.Image.new("RGB", (8, 8)), text="<image> a red circle")
    assert isinstance(inputs["input_ids"], torch.Tensor) and isinstance(inputs["pixel_values"], torch.Tensor)
    assert isinstance(processor(text="a red circle")["input_ids"], torch.Tensor)


# The Python of the other end of the range: `make test-floor` runs this file in the floor's environment and names the
# newest environment's Python here. Both have palme_hf installed from the same checkout.
OTHER_PYTHON = os.environ.get("PALME_HF_OTHER_PYTHON")
cross_release = pytest.mark.skipif(
    not OTHER_PYTHON, reason="needs PALME_HF_OTHER_PYTHON, the other end's Python (`make test-floor` sets it)"
)

# Models of the two shapes: the reference (cross-attention, ALiBi) and the PaLM-E paper's (parallel block, prefix).
MODELS = {
    "reference": {"variant": "reference"},
    "parallel_prefix": {"variant": "prefix", "block_type": "parallel"},
}
GENERATE = {"do_sample": False, "max_new_tokens": 6}

SAVER = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from helpers import tiny_inputs, tiny_model

    folder, options = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = tiny_model(options.pop("variant"), **options)
    model.save_pretrained(folder)
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
    generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=6)
    torch.save({"pixel_values": pixel_values, "input_ids": input_ids}, folder + "/inputs.pt")
    torch.save({"logits": logits, "generated": generated}, folder + "/expected.pt")
    """
)

LOADER = textwrap.dedent(
    """
    import sys
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    folder, how = sys.argv[1], sys.argv[2]
    if how == "palme_hf":
        import palme_hf
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=how == "remote_code").eval()
    module = type(model).__module__
    assert module.startswith("transformers_modules" if how == "remote_code" else "palme_hf"), module
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    torch.save({"logits": logits, "generated": generated, "version": transformers.__version__}, folder + f"/{how}.pt")
    """
)


def run_python(python: str, program: str, *args, cwd):
    """Runs `program` with `python` outside the checkout: no PYTHONPATH, an empty Hugging Face home, no network."""
    env = {**os.environ, "HF_HOME": os.path.join(cwd, "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [python, "-c", program, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def other_release() -> str:
    result = subprocess.run(
        [OTHER_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.slow
@cross_release
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("saved_by", ["this_end", "other_end"])
def test_folder_saved_under_one_end_loads_under_the_other(tmp_path, model_name, saved_by):
    assert other_release() != transformers.__version__, "the other end runs the same Transformers release"
    saver, loader = (sys.executable, OTHER_PYTHON) if saved_by == "this_end" else (OTHER_PYTHON, sys.executable)
    folder = tmp_path / "model"
    run_python(saver, SAVER, folder, json.dumps(MODELS[model_name]), TESTS, cwd=tmp_path)
    expected = torch.load(folder / "expected.pt", weights_only=True)

    run_python(loader, LOADER, folder, "palme_hf", cwd=tmp_path)
    run_python(loader, WITHOUT_PALME_HF + LOADER, folder, "remote_code", cwd=tmp_path)
    for how in ("palme_hf", "remote_code"):
        loaded = torch.load(folder / f"{how}.pt", weights_only=True)
        assert loaded["version"] != json.loads((folder / "config.json").read_text())["transformers_version"]
        torch.testing.assert_close(loaded["logits"], expected["logits"])
        assert torch.equal(loaded["generated"], expected["generated"])

    if saved_by == "other_end":  # and in this process, as a user of this end would load it
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        inputs = torch.load(folder / "inputs.pt", weights_only=True)
        assert torch.equal(model.generate(**inputs, **GENERATE), expected["generated"])
