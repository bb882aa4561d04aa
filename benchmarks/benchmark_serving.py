"""
Serving speed side by side (issue 17): the same PalmE and the same requests, each an image and the captioning prompt
(the chat of one user turn holding the image) with `--new-tokens` greedy new tokens whatever the model says (vLLM's
`ignore_eos`, `generate()`'s `min_new_tokens`), served three ways:

- vLLM's OpenAI-compatible server, all requests sent at once by as many client threads;
- `generate()` one request at a time;
- `generate()` on one batch of all the requests.

All requests arrive at once: a request's latency runs from then to its last token. The script prints, for each way,
the aggregate new tokens per second and the p50/p95 latency of its best round (of `--repeats`, the three ways taking
turns), and the ratios of vLLM's throughput to the two others. The model is a random PaLM-E of the paper's shape
(parallel block, image as prefix tokens, no ALiBi) of `--hidden-size`/`--num-layers`, heads of 64, or `--model`.

Runs in the serving environment (`make test-serve` builds `.venv-serve`):

    .venv-serve/bin/python benchmarks/benchmark_serving.py --repeats 3
"""

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.synthetic_shapes import SyntheticShapesDataset, build_caption_tokenizer
from palme_hf.towers_palme import IMAGE_TOKEN, add_image_token

# The serving tests' server helpers (tests/serve/serving.py, which imports tests/helpers.py).
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path[:0] = [TESTS, os.path.join(TESTS, "serve")]
from serving import SERVED_NAME, start_server, stop_server  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved prefix-route PalmE folder (default: a random one)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each way's best one is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of generate()")
    parser.add_argument("--server-log", default=None, help="the server's log (default: a temporary file)")
    parser.add_argument(
        "--compiled", action="store_true", help="serve with vLLM's compiled mode (torch.compile), not eager"
    )
    return parser.parse_args(argv)


def save_random_model(folder: str, hidden_size: int, num_layers: int) -> str:
    """A random PaLM-E of the paper's shape: PalmE's ViT (64x64 images, 64 patches), parallel decoder layers of heads
    of 64 features, the image as prefix tokens; with the captioner's word-level tokenizer and the image token."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    add_image_token(tokenizer)
    num_heads = hidden_size // 64
    config = PalmEConfig(
        vision_config={"image_size": 64, "patch_size": 8, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
                       "num_attention_heads": num_heads, "head_dim": 64},
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
                     "num_attention_heads": num_heads, "head_dim": 64, "block_type": "parallel",
                     "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_integration="prefix",
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )  # fmt: skip
    torch.manual_seed(0)
    PalmEForConditionalGeneration(config).save_pretrained(folder)
    PalmEProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def serve_with_vllm(client: openai.OpenAI, images: list, new_tokens: int) -> list[float]:
    """Latencies of the requests sent at once to the server."""

    def request(image) -> float:
        response = client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}],
            max_tokens=new_tokens,
            temperature=0,
            extra_body={"ignore_eos": True, "add_special_tokens": True},
        )
        if response.usage.completion_tokens != new_tokens:
            raise RuntimeError(f"vLLM gave {response.usage.completion_tokens} tokens, not {new_tokens}")
        return time.perf_counter() - start

    with ThreadPoolExecutor(len(images)) as pool:
        start = time.perf_counter()
        return list(pool.map(request, images))


def chat_inputs(processor: PalmEProcessor, images: list):
    """The processor's inputs for one captioning chat per image, batched (the prompts are all as long)."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True, tokenize=False
    )
    return processor(images=images, text=[prompt] * len(images), return_tensors="pt")


@torch.no_grad()
def serve_one_at_a_time(model, processor, images: list, new_tokens: int) -> list[float]:
    start, latencies = time.perf_counter(), []
    for image in images:
        model.generate(**chat_inputs(processor, [image]), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        latencies.append(time.perf_counter() - start)
    return latencies


@torch.no_grad()
def serve_as_one_batch(model, processor, images: list, new_tokens: int) -> list[float]:
    start = time.perf_counter()
    model.generate(**chat_inputs(processor, images), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [time.perf_counter() - start] * len(images)


def percentile(values: list[float], fraction: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        folder = args.model or save_random_model(os.path.join(workdir, "model"), args.hidden_size, args.num_layers)
        model = PalmEForConditionalGeneration.from_pretrained(folder).eval()
        processor = PalmEProcessor.from_pretrained(folder)
        held_out = SyntheticShapesDataset(args.requests, "held_out", seed=0)
        images = [held_out[index]["image"] for index in range(args.requests)]
        log_path = args.server_log or os.path.join(workdir, "server.log")
        server, base_url = start_server(folder, log_path, "--max-model-len", "256", eager=not args.compiled)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
        ways = {
            "vLLM (OpenAI server)": lambda: serve_with_vllm(client, images, args.new_tokens),
            "generate(), one at a time": lambda: serve_one_at_a_time(model, processor, images, args.new_tokens),
            f"generate(), a batch of {args.requests}": lambda: serve_as_one_batch(
                model, processor, images, args.new_tokens
            ),
        }
        try:
            for serve in ways.values():  # warm up each way once
                serve()
            best = {}
            for _ in range(args.repeats):
                for name, serve in ways.items():
                    latencies = serve()
                    if name not in best or max(latencies) < max(best[name]):
                        best[name] = latencies
        finally:
            stop_server(server)
    tokens = args.requests * args.new_tokens
    throughput = {name: tokens / max(latencies) for name, latencies in best.items()}
    print(
        f"{args.requests} requests of an image and the captioning prompt, {args.new_tokens} new tokens each; "
        f"model: {args.model or f'random, hidden {args.hidden_size}, {args.num_layers} layers, heads of 64'}; "
        f"vLLM {'compiled' if args.compiled else 'eager'}; best of {args.repeats} rounds; {args.threads} torch "
        f"threads, {os.cpu_count()} CPUs\n"
    )
    print("| way | tokens/s | p50 latency (s) | p95 latency (s) |\n| --- | --- | --- | --- |")
    for name, latencies in best.items():
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        print(f"| {name} | {throughput[name]:.1f} | {p50:.2f} | {p95:.2f} |")
    vllm_name, one_name, batch_name = ways
    print(
        f"\nvLLM / one at a time: {throughput[vllm_name] / throughput[one_name]:.2f}x; "
        f"vLLM / batch: {throughput[vllm_name] / throughput[batch_name]:.2f}x"
    )


if __name__ == "__main__":
    main()
