"""
Writing and reading model folders without losing work: an output folder gets a whole result or nothing, and a model
folder is checked before it is loaded, so that a missing or truncated file is named instead of failing deep inside a
loader. Used by `conversion/convert_zeta_palme.py` and `examples/train_captioner.py`.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator

from safetensors import SafetensorError, safe_open


def check_output_dir(output_dir: str, overwrite: bool = False):
    """
    Refuses (`ValueError`) an `output_dir` that is a file, or a folder that is not empty unless `overwrite`. A folder
    that does not exist yet, or is empty, is fine.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} is not empty; pass --overwrite to replace it (everything in it is deleted).")


@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool = False) -> Iterator[str]:
    """
    Yields a new, empty folder beside `output_dir` to write the result into. When the block succeeds, that folder
    takes the place of `output_dir` (whose old contents are deleted; a non-empty one is refused unless `overwrite`).
    When it fails or is interrupted, the folder is deleted and `output_dir` stays as it was: `output_dir` never holds
    a half-written result.
    """
    check_output_dir(output_dir, overwrite)
    output_dir = os.path.abspath(output_dir)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    # In the same parent, so that the final rename stays on one file system; os.mkdir (unlike tempfile.mkdtemp)
    # gives the folder the user's usual permissions.
    temporary = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(temporary)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if os.path.exists(output_dir):
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old)
        os.replace(temporary, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(temporary, output_dir)


def read_json_file(path: str):
    """The JSON value in `path`; a file that is not valid JSON is a `ValueError` naming it."""
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON (truncated?): {error}") from error


def check_model_folder(model_dir: str):
    """
    Refuses (`ValueError`, naming the file) a folder that `from_pretrained` cannot load as a saved model: one without
    `config.json` (from which `from_pretrained` would build a default configuration and then fail on the sizes), or
    whose safetensors weights are missing, truncated or not safetensors at all.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir} is not a folder.")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{model_dir} has no config.json, so it is not a saved model.")
    read_json_file(config_file)
    index_file = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_files = sorted(set(read_json_file(index_file)["weight_map"].values()))
    else:
        weight_files = ["model.safetensors"]
    for weight_file in weight_files:
        path = os.path.join(model_dir, weight_file)
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir} has no {weight_file}.")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated?): {error}") from error


__all__ = ["atomic_output_dir", "check_model_folder", "check_output_dir", "read_json_file"]
