"""The zeta converter reproduces the recorded reference outputs (tests/fixtures/palme_*) and refuses bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palme_hf import PalmEConfig, PalmEForConditionalGeneration
from palme_hf.conversion_zeta import (
    convert_zeta_palme_checkpoint,
    convert_zeta_palme_state_dict,
    load_zeta_palme,
    zeta_palme_config,
)

from helpers import fixture_path

CASES = ["palme_tiny_default", "palme_tiny_abs_pos"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "conversion", "convert_zeta_palme.py")


def load_case(case):
    with open(fixture_path(case, "kwargs.json")) as handle:
        kwargs = json.load(handle)
    with open(fixture_path(case, "meta.json")) as handle:
        meta = json.load(handle)
    return kwargs, load_file(fixture_path(case, "io.safetensors")), meta


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=CASES)
def converted(request):
    kwargs, io, meta = load_case(request.param)
    model = load_zeta_palme(fixture_path(request.param, "checkpoint.pt"), kwargs)
    return model, io, meta


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_reference_with_fixed_offset(converted, attn_implementation):
    model, io, _ = converted
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        image_features = model.get_image_features(io["pixel_values"]).last_hidden_state
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    assert (image_features - io["encoder_hidden_states"]).abs().max().item() <= 1e-5
    assert relative_error(logits, io["logits_fixed_offset"]) <= 1e-4


def test_logits_match_reference_as_shipped_with_length_offset(converted):
    model, io, _ = converted
    length = io["input_ids"].shape[1]
    original = model.config.text_config.xpos_offset
    model.config.text_config.xpos_offset = length // 2
    try:
        with torch.no_grad():
            logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    finally:
        model.config.text_config.xpos_offset = original
    assert relative_error(logits, io["logits"]) <= 1e-4


def test_loss_matches_reference_wrapper(converted):
    model, io, _ = converted
    # The reference's autoregressive wrapper feeds input_ids[:, :-1], so its xpos offset is (n - 1) // 2.
    length = io["input_ids"].shape[1]
    original = model.config.text_config.xpos_offset
    model.config.text_config.xpos_offset = (length - 1) // 2
    try:
        with torch.no_grad():
            outputs = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"], labels=io["input_ids"])
    finally:
        model.config.text_config.xpos_offset = original
    assert relative_error(outputs.logits[:, :-1], io["wrapper_logits"]) <= 1e-4
    assert abs(outputs.loss.item() - io["wrapper_loss"].item()) <= 1e-5


def test_cached_greedy_generation_matches_reference(converted):
    model, io, meta = converted
    assert model.config.text_config.xpos_offset == meta["xpos_offset_fixed"] or not model.config.text_config.use_rotary
    new_tokens = int(meta["notes"]["greedy_ids"].split("+ ")[1].split(" ")[0])
    prompt_length = io["greedy_ids"].shape[1] - new_tokens
    generated = model.generate(
        pixel_values=io["pixel_values"],
        input_ids=io["greedy_ids"][:, :prompt_length],
        do_sample=False,
        max_new_tokens=new_tokens,
        use_cache=True,
    )
    assert torch.equal(generated, io["greedy_ids"])


def test_converter_quirk_switches():
    config = zeta_palme_config({"max_seq_len": 64, "qk_norm": True})
    assert config.text_config.rotate_values is True
    assert config.text_config.xpos_offset == 32
    assert config.text_config.qk_norm is False  # the reference ignores qk_norm
    assert PalmEConfig.from_zeta_kwargs(max_seq_len=64).text_config.rotate_values is False


def test_cli_writes_a_loadable_folder(tmp_path):
    case = "palme_tiny_default"
    _, io, _ = load_case(case)
    output = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            CONVERTER,
            "--checkpoint",
            fixture_path(case, "checkpoint.pt"),
            "--kwargs",
            fixture_path(case, "kwargs.json"),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "config.json", "generation_config.json", "modeling_palme.py"):
        assert (output / name).exists(), name
    model = PalmEForConditionalGeneration.from_pretrained(output)
    with torch.no_grad():
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    assert relative_error(logits, io["logits_fixed_offset"]) <= 1e-4


def load_converter_main():
    spec = importlib.util.spec_from_file_location("convert_zeta_palme", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_converter(tmp_path, capsys, state_dict, kwargs, *options):
    """Runs the converter's command line in-process, into tmp_path / "out"; returns (exit code, stderr)."""
    checkpoint, kwargs_file = tmp_path / "ckpt.pt", tmp_path / "kwargs.json"
    torch.save(state_dict, checkpoint)
    kwargs_file.write_text(json.dumps(kwargs))
    argv = ["--checkpoint", str(checkpoint), "--kwargs", str(kwargs_file), "--output", str(tmp_path / "out"), *options]
    code = load_converter_main()(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_checkpoint():
    case = "palme_tiny_default"
    kwargs, _, _ = load_case(case)
    return torch.load(fixture_path(case, "checkpoint.pt"), weights_only=True), kwargs


def test_cli_refuses_missing_key(tmp_path, capsys, reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    state_dict = dict(state_dict)
    del state_dict["decoder.net.to_logits.bias"]
    code, stderr = run_converter(tmp_path, capsys, state_dict, kwargs)
    assert code != 0
    assert "missing keys" in stderr and "decoder.net.to_logits.bias" in stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_refuses_unexpected_key(tmp_path, capsys, reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    state_dict = {**state_dict, "decoder.net.extra.weight": torch.zeros(3)}
    code, stderr = run_converter(tmp_path, capsys, state_dict, kwargs)
    assert code != 0
    assert "unexpected keys" in stderr and "decoder.net.extra.weight" in stderr


def test_cli_refuses_wrong_shape(tmp_path, capsys, reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    state_dict = {**state_dict, "encoder.pos_embedding": torch.zeros(1, 9, 64)}
    code, stderr = run_converter(tmp_path, capsys, state_dict, kwargs)
    assert code != 0
    assert "wrongly shaped" in stderr and "encoder.pos_embedding" in stderr


def test_cli_refuses_unknown_kwargs(tmp_path, capsys, reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    code, stderr = run_converter(tmp_path, capsys, state_dict, {**kwargs, "decoder_widht": 64})
    assert code != 0
    assert "decoder_widht" in stderr


def test_cli_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys, reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, stderr = run_converter(tmp_path, capsys, state_dict, kwargs)
    assert code != 0 and f"{output} is not empty" in stderr and "--overwrite" in stderr
    assert os.listdir(output) == ["notes.txt"] and (output / "notes.txt").read_text() == "mine"

    code, stderr = run_converter(tmp_path, capsys, state_dict, kwargs, "--overwrite")
    assert code == 0, stderr
    assert not (output / "notes.txt").exists() and (output / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "kwargs.json", "out"]  # no temporary folder left


def test_cli_names_a_truncated_checkpoint(tmp_path, capsys, reference_checkpoint):
    _, kwargs = reference_checkpoint
    truncated = tmp_path / "truncated.pt"
    data = Path(fixture_path("palme_tiny_default", "checkpoint.pt")).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_text(json.dumps(kwargs))
    output = tmp_path / "out"
    argv = ["--checkpoint", str(truncated), "--kwargs", str(kwargs_file), "--output", str(output)]
    assert load_converter_main()(argv) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {truncated} is not a readable tensor checkpoint"), stderr
    assert not output.exists()


def test_cli_names_a_corrupt_kwargs_file(tmp_path, capsys, reference_checkpoint):
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_text('{"decoder_dim": 6')
    argv = ["--checkpoint", fixture_path("palme_tiny_default", "checkpoint.pt"), "--kwargs", str(kwargs_file)]
    assert load_converter_main()([*argv, "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {kwargs_file} is not valid JSON")


def test_a_failed_save_leaves_the_output_as_it_was(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")

    def fail_halfway(model, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(PalmEForConditionalGeneration, "save_pretrained", fail_halfway)
    case = "palme_tiny_default"
    with pytest.raises(OSError, match="No space left"):
        convert_zeta_palme_checkpoint(
            fixture_path(case, "checkpoint.pt"), fixture_path(case, "kwargs.json"), str(output), overwrite=True
        )
    assert os.listdir(tmp_path) == ["out"] and os.listdir(output) == ["notes.txt"]


def test_mismatched_kwargs_name_the_tensors(reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    config = zeta_palme_config({**kwargs, "decoder_depth": 3})
    with pytest.raises(ValueError, match="decoder.net.attn_layers.layers.6"):
        convert_zeta_palme_state_dict(state_dict, config)


def test_refuses_cross_attend_false():
    with pytest.raises(ValueError, match="cross_attend=False"):
        zeta_palme_config({"cross_attend": False})


def test_refuses_pickled_objects(tmp_path, reference_checkpoint):
    _, kwargs = reference_checkpoint
    checkpoint = tmp_path / "pickle.pt"
    torch.save({"model": PickledPayload()}, checkpoint)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_zeta_palme(str(checkpoint), kwargs)


class PickledPayload:
    """An arbitrary Python object, which a weights-only load must refuse to unpickle."""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_convert_in_their_dtype(tmp_path, capsys, reference_checkpoint, dtype):
    # saved with `model.half()` to halve the file: the rotary buffers are rounded, not different
    state_dict, kwargs = reference_checkpoint
    _, io, _ = load_case("palme_tiny_default")
    half = {key: tensor.to(dtype) for key, tensor in state_dict.items()}
    code, stderr = run_converter(tmp_path, capsys, half, kwargs)
    assert code == 0, stderr
    model = PalmEForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.dtype == dtype and model.lm_head.weight.dtype == dtype
    with torch.no_grad():
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    # the float32 conversion's logits, within the dtype's precision
    assert relative_error(logits.float(), io["logits_fixed_offset"]) <= 4 * torch.finfo(dtype).eps

    code, stderr = run_converter(tmp_path, capsys, half, kwargs, "--overwrite", "--dtype", "float32")
    assert code == 0, stderr
    widened = PalmEForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert widened.dtype == torch.float32
    torch.testing.assert_close(widened.lm_head.weight, half["decoder.net.to_logits.weight"].float())


def test_a_safetensors_checkpoint_converts_and_a_truncated_one_is_named(tmp_path, reference_checkpoint):
    from safetensors.torch import save_file

    state_dict, kwargs = reference_checkpoint
    _, io, _ = load_case("palme_tiny_default")
    checkpoint = tmp_path / "palme.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, checkpoint)
    model = load_zeta_palme(str(checkpoint), kwargs)
    with torch.no_grad():
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    assert relative_error(logits, io["logits_fixed_offset"]) <= 1e-4

    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=f"^{checkpoint} is not a readable safetensors file \\(truncated or corrupt\\)"
    ):
        load_zeta_palme(str(checkpoint), kwargs)


def test_cli_names_a_checkpoint_that_holds_text(tmp_path, capsys, reference_checkpoint):
    _, kwargs = reference_checkpoint
    checkpoint, kwargs_file = tmp_path / "notes.pt", tmp_path / "kwargs.json"
    checkpoint.write_text("these are my notes, not a checkpoint\n" * 20)
    kwargs_file.write_text(json.dumps(kwargs))
    argv = ["--checkpoint", str(checkpoint), "--kwargs", str(kwargs_file), "--output", str(tmp_path / "out")]
    assert load_converter_main()(argv) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {checkpoint} is not a readable tensor checkpoint") and stderr.count("\n") == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"num_tokens": None},
        {"decoder_dim": None},
        {"max_seq_len": None},
        {"num_tokens": 10**20},
        {"decoder_dim": 10**12},
    ]
    + [{"max_seq_len": 10**30}, {"decoder_depth": True}, {"cross_attend": "yes"}],
)
def test_cli_names_a_kwarg_that_is_null_or_absurd(tmp_path, capsys, reference_checkpoint, bad):
    state_dict, kwargs = reference_checkpoint
    code, stderr = run_converter(tmp_path, capsys, state_dict, {**kwargs, **bad})
    key, value = next(iter(bad.items()))
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert f"zeta's PalmE argument `{key}` must be" in stderr and f"got {value!r}" in stderr


def test_kwargs_too_large_to_build_are_refused_before_allocating(reference_checkpoint):
    state_dict, kwargs = reference_checkpoint
    with pytest.raises(ValueError, match="describe tensors too large to build"):
        convert_zeta_palme_state_dict(state_dict, zeta_palme_config({**kwargs, "decoder_dim": 2**30}))


def test_cli_names_a_kwargs_file_that_is_not_utf8(tmp_path, capsys):
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_bytes(b'{"decoder_dim": 64, "note": "caf\xe9"}')
    argv = ["--checkpoint", fixture_path("palme_tiny_default", "checkpoint.pt"), "--kwargs", str(kwargs_file)]
    assert load_converter_main()([*argv, "--output", str(tmp_path / "out")]) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {kwargs_file} is not UTF-8 text") and stderr.count("\n") == 1
