"""Speed-ups specific to one device, kept out of the model code and switched on by the user: they apply to any
PyTorch model (a PalmE, or the `LlamaForCausalLM` it is measured against), and change no result beyond rounding."""

import types

import torch
from torch import nn


def matrix_vector_linear_forward(module: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """
    The forward pass of `nn.Linear` `module`, except for a single bfloat16 row on CPU (a decoding step at batch 1),
    which goes through `torch.mv`: there torch's matrix product reads a bfloat16 weight no faster than a float32 one,
    while its matrix-vector product takes about half the time (docs/speed.md). Compiled graphs keep the matrix
    product, which inductor lowers better than `torch.mv`.

    Args:
        hidden_states (`torch.Tensor` of shape `(..., in_features)`): the input.

    Returns:
        `torch.Tensor` of shape `(..., out_features)`.
    """
    weight, bias = module.weight, module.bias
    if (
        not torch.compiler.is_compiling()
        and hidden_states.dtype == torch.bfloat16
        and hidden_states.device.type == "cpu"
        and hidden_states.numel() == hidden_states.shape[-1]
        and not hasattr(weight, "to_local")  # a tensor-parallel shard keeps its own path
    ):
        vector = hidden_states.reshape(-1)
        output = torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)
        return output.view(*hidden_states.shape[:-1], -1)
    return nn.functional.linear(hidden_states, weight, bias)


def use_matrix_vector_decoding(model: nn.Module) -> nn.Module:
    """
    Makes every `nn.Linear` of `model` compute a single bfloat16 row on CPU with a matrix-vector product
    ([`matrix_vector_linear_forward`]): decoding at batch 1 in bfloat16 on CPU runs faster, other inputs as before.
    The weights and state dict are untouched; a model loaded again starts without it. Returns `model`.

    Example:
        >>> from palme_hf.kernels_palme import use_matrix_vector_decoding
        >>> model = use_matrix_vector_decoding(model.to(torch.bfloat16))
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(matrix_vector_linear_forward, module)
    return model
