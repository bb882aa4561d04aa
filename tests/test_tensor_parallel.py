"""Tensor parallelism: under `torchrun --nproc-per-node 2` (gloo, CPU), `from_pretrained(..., tp_plan="auto")` splits
the vision encoder, the decoder layers (of every block type) and the language-model head across the two processes,
which compute the logits and greedy generations that the whole model computes in one process."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import palme_hf

from helpers import combination_model, tiny_inputs, tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

GENERATE = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6}

# Run by torchrun with the saved models' folders: each rank writes what it computed and its parameters' shapes.
WORKER = textwrap.dedent(
    """
    import sys

    import torch
    from transformers.distributed.utils import is_dtensor

    from palme_hf import PalmEForConditionalGeneration

    for folder in sys.argv[1:]:
        request = torch.load(folder + "/request.pt", weights_only=True)
        model = PalmEForConditionalGeneration.from_pretrained(folder, tp_plan="auto").eval()
        outputs = {
            "shapes": {
                name: tuple((parameter.to_local() if is_dtensor(parameter) else parameter).shape)
                for name, parameter in model.named_parameters()
            }
        }
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                outputs[implementation] = model(**request["inputs"]).logits
            outputs[f"{implementation}_generated"] = model.generate(**request["inputs"], **request["generate"])
        torch.save(outputs, f"{folder}/rank{torch.distributed.get_rank()}.pt")
    """
)

TEXT_LAYERS = "model.language_model.layers.*"
ATTENTION = {"q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "o_proj.weight": 1}
GELU_MLP = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}
SWIGLU_MLP = {"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1}


def split(prefix, parameters):
    return {f"{prefix}.{name}": dim for name, dim in parameters.items()}


# The parameters the two ranks each hold a part of, with the dimension they split (layer numbers as `*`); every other
# parameter is whole on both ranks.
SPLIT_IN_EVERY_CASE = {
    "lm_head.weight": 0,
    "lm_head.bias": 0,
    "model.language_model.embed_tokens.weight": 0,
    **split("model.vision_model.layers.*.self_attn", ATTENTION),
    **split("model.vision_model.layers.*.mlp", GELU_MLP),
}
CROSS_ATTENTION = split(f"{TEXT_LAYERS}.cross_attn.attention", ATTENTION)
MULTI_QUERY_ATTENTION = {"q_proj.weight": 0, "o_proj.weight": 1}  # the single key/value head stays whole
CASES = {
    # ALiBi biases each head through the mask all layers share: the self-attention stays whole
    "standard": (
        lambda: tiny_model("reference"),
        {**split(f"{TEXT_LAYERS}.mlp", GELU_MLP), **CROSS_ATTENTION},
    ),
    "standard_without_alibi": (
        lambda: tiny_model("abs_positions"),
        {**split(f"{TEXT_LAYERS}.self_attn", ATTENTION), **split(f"{TEXT_LAYERS}.mlp", GELU_MLP), **CROSS_ATTENTION},
    ),
    "parallel": (
        lambda: combination_model("parallel", "reference", None),
        {
            **split(f"{TEXT_LAYERS}.self_attn", MULTI_QUERY_ATTENTION),
            **split(f"{TEXT_LAYERS}.mlp", SWIGLU_MLP),
            **CROSS_ATTENTION,
        },
    ),
    # no cross-attention; the resampler stays whole
    "parallel_prefix_resampler": (
        lambda: combination_model("parallel", "prefix", 4),
        {
            **split(f"{TEXT_LAYERS}.self_attn", MULTI_QUERY_ATTENTION),
            **split(f"{TEXT_LAYERS}.mlp", SWIGLU_MLP),
        },
    ),
    "hierarchical": (
        lambda: combination_model("hierarchical", "reference", None),
        {
            **split(f"{TEXT_LAYERS}.self_attn", ATTENTION),
            **split(f"{TEXT_LAYERS}.mlp", {"fc1.weight": 0, "fc2.weight": 1}),
            **CROSS_ATTENTION,
        },
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case's single-process results and parameter shapes, and what each of the two ranks computed."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tensor_parallel")
    expected = {}
    for case, (build, _) in CASES.items():
        model = build()
        pixel_values, input_ids = tiny_inputs(model)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        folder = root / case
        model.save_pretrained(folder)
        torch.save({"inputs": inputs, "generate": GENERATE}, folder / "request.pt")
        run = {"folder": folder, "shapes": {name: tuple(weight.shape) for name, weight in model.named_parameters()}}
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                run[implementation] = model(**inputs).logits
            run[f"{implementation}_generated"] = model.generate(**inputs, **GENERATE)
        expected[case] = run

    worker = root / "worker.py"
    worker.write_text(WORKER)
    # The workers import this palme_hf and the same Transformers; no network.
    source_root = os.path.dirname(os.path.dirname(palme_hf.__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)]
    command += [str(run["folder"]) for run in expected.values()]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    for run in expected.values():
        run["ranks"] = [torch.load(run["folder"] / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    return expected


def split_parameters(full_shapes, rank_shapes):
    """The parameters the ranks hold parts of (layer numbers as `*`), each with the dimension it is split along."""
    splits = {}
    for name, full_shape in full_shapes.items():
        for dim, size in enumerate(full_shape):
            parts = [shapes[name][dim] for shapes in rank_shapes]
            if parts != [size] * len(parts):
                assert sum(parts) == size, (name, full_shape, parts)
                splits[re.sub(r"\.\d+\.", ".*.", name)] = dim
    return splits


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_compute_what_one_process_computes(runs, case):
    run = runs[case]
    ranks = run["ranks"]
    assert split_parameters(run["shapes"], [rank["shapes"] for rank in ranks]) == {
        **SPLIT_IN_EVERY_CASE,
        **CASES[case][1],
    }
    for rank in ranks:
        for implementation in ("eager", "sdpa"):
            torch.testing.assert_close(rank[implementation], run[implementation], rtol=1e-5, atol=1e-5)
            assert torch.equal(rank[f"{implementation}_generated"], run[f"{implementation}_generated"])
