"""
Writing and reading files without losing work, shared by the command line and the scripts that write models
(`palme-hf`, `conversion/convert_zeta_palme.py`, `examples/train_captioner.py`, `examples/train_from_towers.py`,
`examples/evaluate_captioner.py`):

- an output folder gets a whole result or nothing, even when the process is stopped by Ctrl-C or SIGTERM;
- `--overwrite` replaces the previous contents of the output folder and nothing else: an empty path, the folder one
  works in, and an output folder that is, holds or lies inside an input are refused before anything is written;
- every output path is checked writable, and every input image readable, before the work starts, not after it;
- a model folder, a JSON file or an image that cannot be read is a one-line `ValueError` naming the file.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator, Mapping

import PIL.Image
import PIL.ImageOps
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

# Images of more pixels are refused unless the limit is raised (Pillow's own decompression-bomb limit, 89.5 million
# pixels: a 9459x9459 image, about 270 MB decoded as RGB).
DEFAULT_MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS


def one_line(message) -> str:
    """`message` as a single line (runs of whitespace, line breaks included, become one space)."""
    return " ".join(str(message).split())


def exit_with_error(error: BaseException):
    """Ends a command-line script with `error: MESSAGE` on one line of stderr and exit status 1 (a `SystemExit`
    whose code is that line, which Python prints)."""
    sys.exit(f"error: {one_line(error)}")


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """
    While the block runs, SIGTERM (what `kill`, job schedulers and containers send) raises `SystemExit(143)` instead
    of ending the process at once, so that cleanups (`finally`, `atomic_output_dir`) run as they do on Ctrl-C. Only
    a default handler is replaced, and only in the main thread; the previous handler comes back afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_path_given(path: str, what: str = "output folder"):
    """Refuses the empty path, which a script's unset variable gives and which would mean the current folder."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"The {what} is the empty path {path!r} (an unset variable?): give the path explicitly.")


def _is_within(path: str, folder: str) -> bool:
    """Whether the resolved `path` is `folder` or lies inside it (both absolute, links followed)."""
    return os.path.commonpath([path, folder]) == folder


def check_no_overlap(output: str, inputs: Mapping[str, str | None]):
    """
    Refuses (`ValueError`, naming both paths) an output folder that is the same as, holds or lies inside one of
    `inputs` (option name -> path; paths that are `None` or do not exist, such as Hub ids, are left out). Links are
    followed on both sides: replacing such an output folder would delete the input.
    """
    resolved = os.path.realpath(output)
    for option, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        input_path = os.path.realpath(path)
        if resolved == input_path:
            relation = "the same as"
        elif _is_within(input_path, resolved):
            relation = "a folder holding"
        elif _is_within(resolved, input_path):
            relation = "inside"
        else:
            continue
        raise ValueError(
            f"The output folder {output} is {relation} {option} {path}: writing it (and --overwrite, which replaces "
            f"it) would change or delete what {option} holds. Give an output folder apart from it."
        )


def check_writable(path: str, what: str = "output folder"):
    """
    Refuses (`ValueError`, naming the folder in the way) an output `path` that cannot be written: a folder that is
    not writable, or whose parent folder (where the finished result is renamed into place), or the nearest
    existing folder above it when the parent is yet to be made, is not a writable folder. Links are followed.
    """
    resolved = os.path.realpath(path)
    if os.path.isdir(resolved) and not os.access(resolved, os.W_OK | os.X_OK):
        raise ValueError(f"The {what} {path} is not writable.")
    ancestor = os.path.dirname(resolved)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"The {what} {path} cannot be made: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"The {what} {path} cannot be written: the folder {ancestor} is not writable (the result is written "
            "beside its final place and renamed there)."
        )


def check_output_dir(output_dir: str, overwrite: bool = False, inputs: Mapping[str, str | None] | None = None):
    """
    Checks, before any work, that `output_dir` can take a result: refuses (`ValueError`) the empty path, a file, a
    folder that is not empty unless `overwrite`, a folder that cannot be written (see [`check_writable`]), and, with
    or without `overwrite`, the current folder or one that holds it, and a folder that is, holds or lies inside any of
    `inputs` (option name -> path, see [`check_no_overlap`]). A folder that does not exist yet, or is empty, is fine;
    a link to a folder is checked (and later written) as its target.
    """
    check_path_given(output_dir)
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        kind = "a link to nothing" if not os.path.exists(output_dir) else "not a folder"
        raise ValueError(f"{output_dir} exists and is {kind}.")
    resolved, current = os.path.realpath(output_dir), os.path.realpath(os.getcwd())
    if _is_within(current, resolved):
        where = "the current folder" if resolved == current else f"a folder holding the current folder {current}"
        raise ValueError(f"The output folder {output_dir} is {where}, which replacing it would delete; give another.")
    check_no_overlap(output_dir, inputs or {})
    check_writable(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} is not empty; pass --overwrite to replace it (everything in it is deleted).")


def check_output_file(path: str, overwrite: bool = False):
    """
    Checks, before any work, that the file `path` can be written: refuses (`ValueError`) the empty path, a folder,
    an existing file unless `overwrite`, and a path that cannot be written (see [`check_writable`]). A missing parent
    folder is fine when it can be made ([`write_text_file`] makes it).
    """
    check_path_given(path, "output file")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the path of a file to write.")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it.")
    check_writable(path, "output file")


def write_text_file(path: str, text: str):
    """Writes `text` to `path` as UTF-8, as [`write_bytes_file`] does."""
    write_bytes_file(path, text.encode("utf-8"))


def write_bytes_file(path: str, data: bytes):
    """Writes `data` to `path` (making its parent folders) through a temporary file beside it, renamed into place."""
    path = os.path.realpath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_stale_temporaries(output_dir: str):
    """
    Deletes what [`atomic_output_dir`] leaves beside the resolved `output_dir` when its process is killed (SIGKILL,
    power loss): `.NAME.tmp-PID-XXXXXXXX` folders, and `.NAME.old-PID-XXXXXXXX` ones when `output_dir` exists, of
    processes that are no longer running on this machine. Nothing else is touched.
    """
    parent, name = os.path.split(os.path.realpath(output_dir))
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for entry in os.listdir(parent):
        match = pattern.fullmatch(entry)
        if match is None or _process_is_running(int(match[2])):
            continue
        if match[1] == "old" and not os.path.isdir(os.path.join(parent, name)):
            continue  # the only copy of the previous result left by a swap cut short: keep it
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool = False) -> Iterator[str]:
    """
    Yields a new, empty folder beside `output_dir` to write the result into. When the block succeeds, that folder
    takes the place of `output_dir` (whose old contents are deleted; a non-empty one is refused unless `overwrite`,
    as [`check_output_dir`] refuses it). When it fails or is interrupted (Ctrl-C, SIGTERM), the folder is deleted
    and `output_dir` stays as it was: `output_dir` never holds a half-written result. A link to a folder stays a link:
    its target is replaced. Temporaries that killed runs left beside `output_dir` are deleted first.
    """
    check_output_dir(output_dir, overwrite)
    target = os.path.realpath(output_dir)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # In the same parent, so that the final rename stays on one file system; os.mkdir (unlike tempfile.mkdtemp)
    # gives the folder the user's usual permissions.
    temporary = os.path.join(parent, f".{name}.tmp-{tag}")
    os.mkdir(temporary)
    with exit_on_sigterm():
        try:
            yield temporary
            if os.path.exists(target):
                old = os.path.join(parent, f".{name}.old-{tag}")
                try:
                    os.replace(target, old)
                    os.replace(temporary, target)
                except BaseException:  # Ctrl-C between the renames: the previous result goes back in place
                    if os.path.lexists(old) and not os.path.lexists(target):
                        os.replace(old, target)
                    raise
                shutil.rmtree(old)
            else:
                os.replace(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def read_json_file(path: str):
    """The JSON value in `path`; a file that is not valid UTF-8 JSON is a `ValueError` naming it."""
    with open(path, "rb") as handle:
        content = handle.read()
    try:
        return json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as error:
        byte = content[error.start]
        raise ValueError(f"{path} is not UTF-8 text (byte {byte:#04x} at offset {error.start}).") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (truncated?): {error}") from error


def read_json_object(path: str) -> dict:
    """The JSON object in `path`; anything else (a list, a number, invalid JSON) is a `ValueError` naming it."""
    value = read_json_file(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(value).__name__}.")
    return value


def check_model_folder(model_dir: str):
    """
    Refuses (`ValueError`, naming the file) a folder that `from_pretrained` cannot load as a saved model: one without
    `config.json` (from which `from_pretrained` would build a default configuration and then fail on the sizes), or
    one that is not a JSON object, a malformed `model.safetensors.index.json`, and safetensors weights that are
    missing, truncated or not safetensors at all.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir} is not a folder.")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{model_dir} has no config.json, so it is not a saved model.")
    read_json_object(config_file)
    index_file = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_map = read_json_object(index_file).get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(name, str) and os.path.basename(name) == name for name in weight_map.values())
        ):
            raise ValueError(
                f'{index_file} is malformed: expected {{"weight_map": {{tensor name: file name in the folder}}}}.'
            )
        weight_files = sorted(set(weight_map.values()))
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


def load_saved_model(model_class, model_dir: str, **kwargs):
    """
    `model_class.from_pretrained(model_dir, **kwargs)` (a model class or an Auto class) of a folder checked first
    with [`check_model_folder`]. Weights that do not fit the model its `config.json` describes (missing, unexpected or
    misshapen tensors, which `from_pretrained` would leave newly initialised, or refuse after a page of report) and a
    `config.json` that does not build a model are a one-line `ValueError` naming the folder.
    """
    check_model_folder(model_dir)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the loading report; the error below says what is wrong
    try:
        model, info = model_class.from_pretrained(
            model_dir, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as error:
        reason = f"{type(error).__name__}: {one_line(error)[:300]}"
        raise ValueError(f"{model_dir} does not load as a saved model ({reason}).") from error
    finally:
        logging.set_verbosity(verbosity)
    problems = [
        f"{key} is {tuple(saved)} in the weights, {tuple(built)} in the model"
        for key, saved, built in info["mismatched_keys"]
    ]
    problems += [f"{key} is missing from the weights" for key in sorted(info["missing_keys"])]
    problems += [f"{key} in the weights is not in the model" for key in sorted(info["unexpected_keys"])]
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise ValueError(f"The weights in {model_dir} do not fit the model its config.json describes: {shown}.")
    return model


def load_saved_processor(processor_class, model_dir: str):
    """`processor_class.from_pretrained(model_dir)` (a processor class or `AutoProcessor`); a folder without a
    readable processor (image processor and tokenizer) is a `ValueError` naming it."""
    try:
        return processor_class.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{model_dir} has no processor (image processor and tokenizer): {one_line(error)}") from error


def check_torch_file(path: str):
    """Refuses (`ValueError`, naming it) a `torch.save` file that is missing, truncated or corrupt (its zip archive
    is read through, checking every member's checksum, without unpickling anything)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing.")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable torch.save file (truncated?): {error}") from error
    if damaged is not None:
        raise ValueError(f"{path} is corrupt: its member {damaged} fails its checksum.")


def read_image_file(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """
    The image in the file `path`, decoded and turned upright by its EXIF orientation; a `ValueError` that says why
    not: no such file, a folder, an empty file, not an image Pillow reads, more than `max_pixels` pixels (checked
    before decoding), or a truncated or corrupt image.
    """
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    if not os.path.exists(path):
        raise ValueError("no such file")
    if os.path.getsize(path) == 0:
        raise ValueError("is an empty file (0 bytes), not an image")
    bomb_limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None  # the limit is `max_pixels`, checked below
    try:
        with PIL.Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"is {image.width}x{image.height} = {image.width * image.height:,} pixels, more than the limit of "
                    f"{max_pixels:,} (--max-image-pixels raises it)"
                )
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:  # SyntaxError: some broken headers
        reason = f"{type(error).__name__}: {one_line(error)[:200]}"
        raise ValueError(f"could not read an image from it ({reason})") from error
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = bomb_limit


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "atomic_output_dir",
    "check_model_folder",
    "check_no_overlap",
    "check_output_dir",
    "check_output_file",
    "check_path_given",
    "check_torch_file",
    "check_writable",
    "exit_on_sigterm",
    "exit_with_error",
    "load_saved_model",
    "load_saved_processor",
    "one_line",
    "read_image_file",
    "read_json_file",
    "read_json_object",
    "remove_stale_temporaries",
    "write_bytes_file",
    "write_text_file",
]
