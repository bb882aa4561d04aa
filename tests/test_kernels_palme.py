"""The opt-in device speed-ups of kernels_palme.py: same results as the plain layers."""

import pytest
import torch

from palme_hf.kernels_palme import use_matrix_vector_decoding

from helpers import tiny_inputs, tiny_model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (48,), (3, 48)])
def test_linear_layers_give_the_same_result_for_a_single_bfloat16_row(bias, shape):
    # A bfloat16 row on CPU goes through a matrix-vector product (a decoding step at batch 1), more rows through
    # the matrix product: same values, same shapes, gradients too.
    model = use_matrix_vector_decoding(tiny_model(block_type="parallel").to(torch.bfloat16))
    layer = use_matrix_vector_decoding(torch.nn.Linear(48, 40, bias=bias).to(torch.bfloat16))
    hidden_states = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    output = layer(hidden_states)
    expected = torch.nn.functional.linear(
        hidden_states.float(), layer.weight.float(), None if not bias else layer.bias.float()
    )
    assert output.shape == expected.shape and output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=0.05, rtol=0.02)
    output.sum().backward()
    assert hidden_states.grad.shape == hidden_states.shape and layer.weight.grad is not None
    # the whole model: a cached single-token step (matrix-vector products) matches the full forward pass
    _, input_ids = tiny_inputs(model, batch_size=1, length=6)
    pixel_values = torch.rand(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        full = model(pixel_values=pixel_values, input_ids=input_ids).logits[:, -1]
        prompt = model(pixel_values=pixel_values, input_ids=input_ids[:, :-1], use_cache=True)
        step = model(input_ids=input_ids[:, -1:], cache=prompt.past_key_values).logits[:, -1]
    torch.testing.assert_close(step.float(), full.float(), atol=0.05, rtol=0.05)
