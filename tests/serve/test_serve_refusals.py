"""Models vLLM cannot serve faithfully (ALiBi, the hierarchical block, cross-attention to the image) are refused when
vLLM loads them, with a message naming the option, rather than served wrong."""

import pytest
from transformers import AutoConfig, AutoModel

from serving import REFUSED_MODELS, start_server

REFUSAL = "ValueError: The attention implementation 'vllm'"


@pytest.mark.parametrize("name", list(REFUSED_MODELS))
def test_vllm_backend_refuses_to_build_the_model_naming_the_option(name, tmp_path):
    # what vLLM's Transformers modeling backend does with a saved folder: the config and the base model from the
    # folder's own code (`auto_map`), the text config's attention implementation set to vLLM's kernel
    import vllm.model_executor.models.transformers  # noqa: F401  (registers the "vllm" attention implementation)

    save_model, option = REFUSED_MODELS[name]
    config = AutoConfig.from_pretrained(save_model(str(tmp_path / "model")), trust_remote_code=True)
    config.get_text_config()._attn_implementation = "vllm"
    with pytest.raises(ValueError, match=f"`{option}`"):
        AutoModel.from_config(config, trust_remote_code=True)


def test_server_refuses_the_model_at_load_naming_the_option(tmp_path):
    save_model, option = REFUSED_MODELS["alibi"]
    log_path = tmp_path / "server.log"
    with pytest.raises(AssertionError, match="the server exited"):
        start_server(save_model(str(tmp_path / "model")), str(log_path))
    refusal = next(line for line in log_path.read_text().splitlines() if REFUSAL in line)
    assert f"`{option}`" in refusal
