"""The one difference between the Transformers releases palme_hf supports (5.23 to 5.24) that the models see: 5.24
renamed the cache argument and output field `past_key_values` to `cache`. palme_hf's code uses the new name; this
module maps it onto the installed release."""

import functools
import inspect

import transformers
from packaging import version
from transformers.utils.deprecation import deprecate_kwarg

CACHE_IS_RENAMED = version.parse(transformers.__version__).release >= (5, 24)
# The name under which `generate()` passes the cache to `forward` and reads it back from the outputs.
CACHE_NAME = "cache" if CACHE_IS_RENAMED else "past_key_values"


def accept_past_key_values(forward):
    """
    Lets `forward(cache=...)` also be called as `forward(past_key_values=...)`: deprecated from Transformers 5.24 on
    (with the same warning as its own models), and the name `generate()` itself passes on 5.23.
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

    # generate() of 5.23 checks the arguments it passes against the signature of `forward`
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
