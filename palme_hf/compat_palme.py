"""What differs between the Transformers releases palme_hf supports (5.19 to 5.25), and the one place where it does.
palme_hf's code uses the newest release's names; each shim below maps one of them onto the installed release and
names the releases it serves:
- 5.24 renamed the cache argument and output field `past_key_values` to `cache` (5.19 to 5.23 use the old name);
- 5.21 takes a composite config's sub-config classes as `sub_configs_defaults = {key: ConfigClass}` (5.20 only as
  `SubConfigSpec`s, 5.19 only as `sub_configs`);
- `slice_logits_to_keep` is in `transformers.modeling_utils` from 5.21 on (5.19 and 5.20 slice inline);
- 5.23 named gradient checkpointing "activation checkpointing" (`activation_checkpointing_enable`, 5.19 to 5.22
  have only `gradient_checkpointing_enable`);
- 5.23 reads a processor's default keyword arguments from its class attributes (`text_kwargs = {...}`), 5.19 to
  5.22 only from `valid_processor_kwargs._defaults`.
"""

import functools
import inspect

import torch
import transformers
from packaging import version
from transformers import PreTrainedConfig
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import ProcessorMixin
from transformers.utils.deprecation import deprecate_kwarg

TRANSFORMERS_RELEASE = version.parse(transformers.__version__).release

CACHE_IS_RENAMED = TRANSFORMERS_RELEASE >= (5, 24)
# The name under which `generate()` passes the cache to `forward` and reads it back from the outputs.
CACHE_NAME = "cache" if CACHE_IS_RENAMED else "past_key_values"


def accept_past_key_values(forward):
    """
    Lets `forward(cache=...)` also be called as `forward(past_key_values=...)`: deprecated from Transformers 5.24 on
    (with the same warning as its own models), and the name `generate()` itself passes on 5.19 to 5.23.
    """
    if CACHE_IS_RENAMED:
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    # generate() of 5.19 to 5.23 checks the arguments it passes against the signature of `forward`
    signature = inspect.signature(forward)
    parameters = list(signature.parameters.values())
    past_key_values = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    variadic = [i for i, parameter in enumerate(parameters) if parameter.kind is inspect.Parameter.VAR_KEYWORD]
    parameters.insert(variadic[0] if variadic else len(parameters), past_key_values)
    wrapped.__signature__ = signature.replace(parameters=parameters)
    return wrapped


def cache_field(cache) -> dict:
    """The keyword argument that sets the cache field of a Transformers `ModelOutput` of the installed release."""
    return {CACHE_NAME: cache}


if TRANSFORMERS_RELEASE >= (5, 21):
    NewestNamesPreTrainedConfig = PreTrainedConfig
else:

    class NewestNamesPreTrainedConfig(PreTrainedConfig):
        """`PreTrainedConfig` taking Transformers 5.21's `sub_configs_defaults = {key: ConfigClass}`, the classes of a
        composite config's sub-configs, on 5.20 (which takes only `SubConfigSpec`s) and 5.19 (`sub_configs`)."""

        sub_configs_defaults = {}

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            declared = cls.__dict__.get("sub_configs_defaults", {})
            if TRANSFORMERS_RELEASE >= (5, 20):
                from transformers.configuration_utils import SubConfigSpec

                cls.sub_configs_defaults = {key: SubConfigSpec(config_class) for key, config_class in declared.items()}
            else:
                cls.sub_configs = dict(declared)


if TRANSFORMERS_RELEASE >= (5, 21):
    from transformers.modeling_utils import slice_logits_to_keep
else:

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """
        Transformers 5.21's `slice_logits_to_keep`, for 5.19 and 5.20: the positions of `hidden_states` (batch,
        sequence, hidden) that the language-model head projects. `logits_to_keep` is an `int` (the last that many
        positions, 0 for all), a 1D tensor of positions for every sample, a 2D integer tensor (batch, positions) of
        positions per sample, or a 2D boolean mask (batch, sequence), whose `True` positions come back flattened to
        (number of `True`, hidden).
        """
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden_states[:, logits_to_keep, :]


if TRANSFORMERS_RELEASE >= (5, 23):
    NewestNamesPreTrainedModel = PreTrainedModel
else:

    class NewestNamesPreTrainedModel(PreTrainedModel):
        """`PreTrainedModel` with Transformers 5.23's names for gradient checkpointing, for 5.19 to 5.22."""

        def activation_checkpointing_enable(
            self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
        ):
            """Checkpoints the layers' activations in training: `gradient_checkpointing_enable` of 5.19 to 5.22."""
            self.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )

        def activation_checkpointing_disable(self):
            """Keeps every activation again: `gradient_checkpointing_disable` of 5.19 to 5.22."""
            self.gradient_checkpointing_disable()


MODALITY_KWARGS = ("text_kwargs", "images_kwargs", "audio_kwargs", "videos_kwargs")


def processor_defaults(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """
    Class decorator: the processor's default keyword arguments, set as class attributes (`text_kwargs = {...}`) as
    Transformers 5.23 on reads them, also reach 5.19 to 5.22, which read only `valid_processor_kwargs._defaults`.
    """
    if TRANSFORMERS_RELEASE >= (5, 23):
        return processor_class
    defaults = {name: dict(vars(processor_class)[name]) for name in MODALITY_KWARGS if name in vars(processor_class)}

    class ProcessorKwargs(processor_class.valid_processor_kwargs, total=False):
        _defaults = defaults

    ProcessorKwargs.__name__ = ProcessorKwargs.__qualname__ = f"{processor_class.__name__}Kwargs"
    processor_class.valid_processor_kwargs = ProcessorKwargs
    return processor_class
