"""palme_hf: PaLM-E style vision-language models as Transformers models. The training helpers of the examples stay in
their modules: `palme_hf.captioning` (collator, greedy captions, metrics) and `palme_hf.synthetic_shapes` (data)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .blocks_palme import ParallelTransformerBlock, PerceiverLayer, TransformerBlock
from .configuration_palme import PalmEConfig, PalmETextConfig, PalmEVisionConfig
from .hierarchical_palme import HierarchicalBlock
from .modeling_palme import (
    PalmEForCausalLM,
    PalmEForConditionalGeneration,
    PalmEModel,
    PalmEPreTrainedModel,
    PalmETextModel,
    PalmEVisionModel,
)
from .processing_palme import PalmEImageProcessor, PalmEProcessor
from .towers_palme import PalmEMultiModalProjector

__version__ = "0.2.0"

AutoConfig.register(PalmEConfig.model_type, PalmEConfig, exist_ok=True)
AutoConfig.register(PalmEVisionConfig.model_type, PalmEVisionConfig, exist_ok=True)
AutoConfig.register(PalmETextConfig.model_type, PalmETextConfig, exist_ok=True)
AutoModel.register(PalmEConfig, PalmEModel, exist_ok=True)
AutoModel.register(PalmEVisionConfig, PalmEVisionModel, exist_ok=True)
AutoModel.register(PalmETextConfig, PalmETextModel, exist_ok=True)
AutoModelForImageTextToText.register(PalmEConfig, PalmEForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(PalmETextConfig, PalmEForCausalLM, exist_ok=True)
AutoImageProcessor.register(PalmEConfig, image_processor_classes={"pil": PalmEImageProcessor}, exist_ok=True)
AutoProcessor.register(PalmEConfig, PalmEProcessor, exist_ok=True)

# `save_pretrained` writes an `auto_map` and copies these modules, so that a saved model loads with
# `trust_remote_code=True` where palme_hf is not installed.
PalmEConfig.register_for_auto_class()
PalmETextConfig.register_for_auto_class()
PalmEModel.register_for_auto_class("AutoModel")
PalmEForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
PalmEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PalmEImageProcessor.register_for_auto_class("AutoImageProcessor")
PalmEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "HierarchicalBlock",
    "ParallelTransformerBlock",
    "PerceiverLayer",
    "TransformerBlock",
    "PalmEConfig",
    "PalmEForCausalLM",
    "PalmEForConditionalGeneration",
    "PalmEImageProcessor",
    "PalmEModel",
    "PalmEMultiModalProjector",
    "PalmEPreTrainedModel",
    "PalmEProcessor",
    "PalmETextConfig",
    "PalmETextModel",
    "PalmEVisionConfig",
    "PalmEVisionModel",
]
