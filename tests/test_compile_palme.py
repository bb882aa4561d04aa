"""`torch.compile(model.forward, fullgraph=True)`: decoding with a static cache compiles without graph breaks and gives
the ids of eager decoding, for every block type and both image routes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import combination_model, tiny_inputs
from test_generation_palme import COMBINATIONS


@pytest.mark.slow
@pytest.mark.parametrize("block_type, integration", COMBINATIONS)
def test_compiled_static_cache_decoding_matches_eager(block_type, integration):
    model = combination_model(block_type, integration, None)
    assert model._can_compile_fullgraph
    pixel_values, input_ids = tiny_inputs(model)
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    eager = model.generate(**kwargs, cache_implementation="static")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
    compiled = model.generate(**kwargs, cache_implementation="static")
    # one graph for the prefill (with the image), one for the decoding steps that reuse its keys/values
    assert counter.frame_count >= 2
    assert torch.equal(compiled, eager)
