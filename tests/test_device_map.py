"""Serving across devices with accelerate: a model split over CPU and disk generates what the whole model
generates, and automatic device maps never split a layer."""

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights

from palme_hf import PalmEForConditionalGeneration

from helpers import combination_model, tiny_inputs


def model_size_in_bytes(model):
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


@pytest.mark.parametrize("block_type", ["standard", "parallel", "hierarchical"])
def test_cpu_and_disk_offload_generates_like_the_whole_model(tmp_path, block_type):
    model = combination_model(block_type, "reference", 4)
    pixel_values, input_ids = tiny_inputs(model)
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    expected = model.generate(**kwargs)
    model.save_pretrained(tmp_path / "model")

    split = PalmEForConditionalGeneration.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": model_size_in_bytes(model) // 2},
        offload_folder=tmp_path / "offload",
    )
    devices = set(split.hf_device_map.values())
    assert devices == {"cpu", "disk"}, split.hf_device_map
    assert torch.equal(split.generate(**kwargs), expected)


def test_automatic_device_map_never_splits_a_layer():
    model = combination_model("standard", "reference", 4)
    with init_empty_weights():
        empty = PalmEForConditionalGeneration(model.config)
    size = model_size_in_bytes(model)
    # two small fake GPUs that together hold most of the model, the rest on the CPU
    device_map = infer_auto_device_map(
        empty,
        max_memory={0: int(size * 0.35), 1: int(size * 0.35), "cpu": 2 * size},
        no_split_module_classes=empty._no_split_modules,
    )
    assert {0, 1} <= set(device_map.values()), device_map

    def device_of(parameter_name):
        prefix = max(
            (key for key in device_map if parameter_name == key or parameter_name.startswith(key + ".")), key=len
        )
        return device_map[prefix]

    unsplittable = [name for name, module in empty.named_modules() if type(module).__name__ in empty._no_split_modules]
    assert unsplittable
    for module_name in unsplittable:
        devices = {
            device_of(f"{module_name}.{name}") for name, _ in empty.get_submodule(module_name).named_parameters()
        }
        assert len(devices) == 1, (module_name, devices)
