#!/usr/bin/env python
"""PalmE (every block type) side by side with a Transformers Llama of the same size, in one process.

    python benchmarks/benchmark_generation.py                       # the whole table
    python benchmarks/benchmark_generation.py --sections decode --dtypes float32 --repeats 3
    python benchmarks/benchmark_generation.py --sections prefill --models hierarchical hierarchical-w128

Models, built here with random weights (speed does not depend on them): PalmE at the reference's default geometry
(`PalmEConfig()`, its text decoder of `standard`, `parallel` or `hierarchical` blocks; `hierarchical-w128` is the
hierarchical block with `window_size=128`), each seeing one image per sequence through cross-attention, and the
matched `LlamaForCausalLM` (hidden 512, 6 layers, 8 heads, intermediate 2048, vocabulary 20000, untied), text only.
Runs are interleaved (repeat 1 of every model, then repeat 2, ...) and each figure is the best of `--repeats`.

Sections (`--sections`):
- `decode`: greedy decoding at batch 1 after an 8-token prompt, `DynamicCache`; tokens/s of the decoding steps
  (timed from the first to the last token, so without the prompt and the image).
- `batch-decode`: the same at batch 8 after 1024-token prompts.
- `compile`: batch 1 with `StaticCache` and the forward pass compiled by `generate()` (`torch.compile`, inductor, see
  `compile_config`); also shown against the model's own eager `DynamicCache` decoding when `decode` ran in the same
  dtype.
- `prefill`: one forward pass over `--prefill-lengths` tokens at batch 1 (cache filled, last logits only), tokens/s.
- `train`: one training step (forward, backward, AdamW) at batch 8 x 256 tokens, tokens/s.
- `memory`: self-attention cache bytes per token after a 1024-token prompt, and the peak memory that generating
  (1024-token prompt, 32 new tokens) and a `--prefill-lengths` prefill add to the model's own, each measured in a
  fresh subprocess (peak RSS on CPU, `max_memory_allocated` on CUDA).
Every section runs in each of `--dtypes` (`decode` interleaves the dtypes too); ratios are to Llama in the same run,
and the `bf16 / own fp32` and `compiled static / own eager dynamic` rows compare a model with itself.
"""

import argparse
import json
import multiprocessing
import os
import platform
import time
from functools import partial

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from palme_hf import PalmEConfig, PalmEForConditionalGeneration
from palme_hf.kernels_palme import use_matrix_vector_decoding

MODELS = ["llama", "standard", "parallel", "hierarchical", "hierarchical-w128"]
SECTIONS = ["decode", "batch-decode", "compile", "prefill", "train", "memory"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# `--matrix-vector-decoding`: every model, Llama included, computes a single bfloat16 row on CPU with `torch.mv`
MATRIX_VECTOR_DECODING = False


def build_model(name: str, dtype: torch.dtype, device: str, max_length: int):
    """The model `name` in eval mode, and a function giving its inputs `(batch_size, length)`."""
    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=2048,
            vocab_size=20000,
            tie_word_embeddings=False,
            max_position_embeddings=max_length,
        )
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config)
        image = None
    else:
        text_config = {"block_type": name.split("-")[0]}
        if name == "hierarchical-w128":
            text_config["window_size"] = 128
        config = PalmEConfig(text_config=text_config)
        model = PalmEForConditionalGeneration(config)
        image = config.vision_config.image_size
    model = model.to(device, dtype).eval()
    if MATRIX_VECTOR_DECODING:
        use_matrix_vector_decoding(model)
    vocab_size = model.config.get_text_config().vocab_size

    def make_inputs(batch_size: int, length: int) -> dict:
        generator = torch.Generator().manual_seed(length)
        inputs = {"input_ids": torch.randint(0, vocab_size, (batch_size, length), generator=generator).to(device)}
        if image is not None:
            inputs["pixel_values"] = torch.rand(batch_size, 3, image, image, generator=generator).to(device, dtype)
        return inputs

    return model, make_inputs


class StepTimer(LogitsProcessor):
    """Records the time at which each new token's logits arrive; changes nothing."""

    def __init__(self, device: str):
        self.device = device
        self.times = []

    def __call__(self, input_ids, scores):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def decode_rate(model, inputs, new_tokens: int, device: str, **generate_kwargs) -> float:
    """Tokens/s of the decoding steps of a greedy `generate()` (from the first new token to the last)."""
    timer = StepTimer(device)
    output = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        logits_processor=LogitsProcessorList([timer]),
        **generate_kwargs,
    )
    batch_size, prompt_length = inputs["input_ids"].shape
    assert output.shape[1] - prompt_length == new_tokens and len(timer.times) == new_tokens
    return batch_size * (new_tokens - 1) / (timer.times[-1] - timer.times[0])


def timed(function, device: str) -> float:
    """Seconds `function()` takes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compile_config() -> CompileConfig:
    """
    Inductor with its C++ wrapper (the graph's calls without a Python wrapper) and without guards on the modules'
    attributes (they do not change between steps): each takes about 0.5 ms off a CPU decoding step at batch 1.
    """
    config = CompileConfig(
        fullgraph=True,
        mode=None,
        options={"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe},
    )
    # generate() compiles on accelerators only, unless told otherwise
    config._compile_all_devices = True
    return config


def training_step(model, optimizer, inputs):
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def self_attention_cache_bytes(cache) -> int:
    """Bytes the self-attention part of a cache holds (keys, values, token-shift states; not the image's)."""
    cache = getattr(cache, "self_attention_cache", cache)
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "conv_states", {}).values())
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def prefill_rate(built: dict, inputs: dict, length: int, device: str, name: str) -> float:
    """Tokens/s of one forward pass of `built[name]` over its `inputs` (filling a cache, the last logits only)."""
    model = built[name][0]
    return length / timed(lambda: model(**inputs[name], use_cache=True, logits_to_keep=1), device)


def interleaved(names, repeats, measure, higher_is_better=True) -> dict:
    """`measure(name)` for every name, repeat by repeat; the best of each."""
    results = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            results[name].append(measure(name))
    pick = max if higher_is_better else min
    return {name: pick(values) for name, values in results.items()}


def memory_worker(name, dtype_name, device, task, length, max_length, queue):
    """In a fresh process: the peak memory (bytes) `task` adds to the built model's own."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, make_inputs = build_model(name, DTYPES[dtype_name], device, max_length)
    if task == "generate":
        inputs = make_inputs(1, length)
        run = lambda: model.generate(**inputs, do_sample=False, max_new_tokens=32, min_new_tokens=32)  # noqa: E731
    else:
        inputs = make_inputs(1, length)
        run = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            queue.put(torch.cuda.max_memory_allocated() - before)
            return
        before = read_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak (VmHWM) to the current RSS
        run()
        queue.put(read_status("VmHWM") - before)


def read_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(name, dtype_name, device, task, length, max_length) -> int:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=memory_worker, args=(name, dtype_name, device, task, length, max_length, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


class Table:
    """Rows of `setting | model values`, each with its ratio to the row's reference (Llama by default)."""

    def __init__(self, models):
        self.models = models
        self.rows = []

    def add(self, setting, unit, values, reference="llama", fmt="{:.1f}"):
        cells = []
        for name in self.models:
            if name not in values:
                cells.append("")
                continue
            cell = fmt.format(values[name])
            base = values.get(reference) if isinstance(reference, str) else reference.get(name)
            if base and name != reference:
                cell += f" ({values[name] / base:.2f}x)"
            cells.append(cell)
        self.rows.append((setting, unit, cells))
        print(f"  {setting} [{unit}]: " + ", ".join(f"{n}={c}" for n, c in zip(self.models, cells) if c), flush=True)

    def markdown(self) -> str:
        lines = ["| setting | unit | " + " | ".join(self.models) + " |"]
        lines.append("| --- | --- |" + " --- |" * len(self.models))
        lines += [f"| {setting} | {unit} | " + " | ".join(cells) + " |" for setting, unit, cells in self.rows]
        return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens at batch 1")
    parser.add_argument("--batch-new-tokens", type=int, default=16, help="decoded tokens at batch 8")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--matrix-vector-decoding",
        action="store_true",
        help="apply palme_hf.kernels_palme.use_matrix_vector_decoding to every model, Llama included",
    )
    args = parser.parse_args()
    global MATRIX_VECTOR_DECODING
    MATRIX_VECTOR_DECODING = args.matrix_vector_decoding
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())
    device = args.device
    max_length = max(args.prefill_lengths + [1024 + args.batch_new_tokens, 8 + args.new_tokens]) + 64

    cpu = platform.processor() or platform.machine()
    if device == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    print(
        f"device={device} ({device_name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"best of {args.repeats}, interleaved",
        flush=True,
    )
    table = Table(args.models)
    decode_results = {}
    if "decode" in args.sections:
        benchmark_decode(args, device, max_length, table, decode_results)
    for dtype_name in args.dtypes:
        benchmark_dtype(args, dtype_name, device, max_length, table, decode_results)
    print()
    print(table.markdown())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": device_name,
                    "threads": torch.get_num_threads(),
                    "models": table.models,
                    "rows": table.rows,
                },
                handle,
                indent=1,
            )


def benchmark_decode(args, device: str, max_length: int, table: Table, decode_results: dict):
    """Batch-1 decoding of every model in every dtype, all interleaved (so that `bf16 / own fp32` compares runs made
    side by side); the rates per dtype into `decode_results`."""
    runs = {
        (name, dtype_name): build_model(name, DTYPES[dtype_name], device, max_length)
        for dtype_name in args.dtypes
        for name in args.models
    }
    sizes = {name: sum(p.numel() for p in runs[name, args.dtypes[0]][0].parameters()) / 1e6 for name in args.models}
    table.add("parameters", "M", sizes)
    inputs = {key: make(1, 8) for key, (_, make) in runs.items()}
    with torch.inference_mode():
        for key, (model, _) in runs.items():  # warm-up
            decode_rate(model, inputs[key], 4, device)
        rates = interleaved(
            list(runs), args.repeats, lambda key: decode_rate(runs[key][0], inputs[key], args.new_tokens, device)
        )
    for dtype_name in args.dtypes:
        decode_results[dtype_name] = {name: rates[name, dtype_name] for name in args.models}
        short = "fp32" if dtype_name == "float32" else "bf16"
        table.add(f"decode, batch 1, 8-token prompt, dynamic cache, {short}", "tokens/s", decode_results[dtype_name])
    if "float32" in decode_results and "bfloat16" in decode_results:
        table.add(
            "decode, batch 1: bf16 / own fp32",
            "tokens/s",
            decode_results["bfloat16"],
            reference=decode_results["float32"],
        )


def benchmark_dtype(args, dtype_name: str, device: str, max_length: int, table: Table, decode_results: dict):
    """Every section of `args.sections` in `dtype_name`, into `table`; batch-1 decoding rates into `decode_results`."""
    dtype = DTYPES[dtype_name]
    short = "fp32" if dtype == torch.float32 else "bf16"
    built = {name: build_model(name, dtype, device, max_length) for name in args.models}
    if dtype_name == args.dtypes[0] and "decode" not in args.sections:
        sizes = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, (model, _) in built.items()}
        table.add("parameters", "M", sizes)

    with torch.inference_mode():
        if "batch-decode" in args.sections:
            inputs = {name: make(8, 1024) for name, (_, make) in built.items()}
            rates = interleaved(
                args.models,
                args.repeats,
                lambda n: decode_rate(built[n][0], inputs[n], args.batch_new_tokens, device),
            )
            table.add(f"decode, batch 8, 1024-token prompts, dynamic cache, {short}", "tokens/s", rates)

        if "compile" in args.sections:
            inputs = {name: make(1, 8) for name, (_, make) in built.items()}
            compiled = {"cache_implementation": "static", "compile_config": compile_config()}
            for name, (model, _) in built.items():  # compiles the prefill and the decoding graphs
                start = time.perf_counter()
                decode_rate(model, inputs[name], args.new_tokens, device, **compiled)
                print(f"  compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
            rates = interleaved(
                args.models,
                args.repeats,
                lambda n: decode_rate(built[n][0], inputs[n], args.new_tokens, device, **compiled),
            )
            table.add(f"decode, batch 1, static cache + torch.compile, {short}", "tokens/s", rates)
            if dtype_name in decode_results:
                table.add(
                    "decode, batch 1: compiled static / own eager dynamic",
                    "tokens/s",
                    rates,
                    reference=decode_results[dtype_name],
                )
            torch._dynamo.reset()

        if "prefill" in args.sections:
            for length in args.prefill_lengths:
                inputs = {name: make(1, length) for name, (_, make) in built.items()}
                speeds = interleaved(args.models, args.repeats, partial(prefill_rate, built, inputs, length, device))
                table.add(f"prefill, {length} tokens, {short}", "tokens/s", speeds)
                if "hierarchical" in speeds and "hierarchical-w128" in speeds:
                    table.add(
                        f"prefill, {length} tokens: window 128 / full attention",
                        "tokens/s",
                        {"hierarchical-w128": speeds["hierarchical-w128"]},
                        reference={"hierarchical-w128": speeds["hierarchical"]},
                    )

    if "train" in args.sections:
        inputs = {name: make(8, 256) for name, (_, make) in built.items()}
        optimizers = {}
        for name, (model, _) in built.items():
            model.train()
            optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-5)
            training_step(model, optimizers[name], inputs[name])  # warm-up, and the optimizer's state
        speeds = interleaved(
            args.models,
            args.repeats,
            lambda n: 8 * 256 / timed(lambda: training_step(built[n][0], optimizers[n], inputs[n]), device),
        )
        table.add(f"training step, batch 8 x 256, AdamW, {short}", "tokens/s", speeds)
        del optimizers

    if "memory" in args.sections:
        with torch.inference_mode():
            per_token = {}
            for name, (model, make) in built.items():
                output = model(**make(1, 1024), use_cache=True, logits_to_keep=1)
                per_token[name] = self_attention_cache_bytes(output.past_key_values) / 1024
        table.add(f"self-attention cache after 1024 tokens, {short}", "bytes/token", per_token, fmt="{:.0f}")
        del built
        peaks = {n: peak_memory(n, dtype_name, device, "generate", 1024, max_length) for n in args.models}
        table.add(
            f"peak memory, generating 32 tokens after 1024, {short}",
            "MiB",
            {n: v / 2**20 for n, v in peaks.items()},
        )
        for length in args.prefill_lengths:
            peaks = {n: peak_memory(n, dtype_name, device, "prefill", length, max_length) for n in args.models}
            table.add(
                f"peak memory, prefill {length} tokens, {short}", "MiB", {n: v / 2**20 for n, v in peaks.items()}
            )


if __name__ == "__main__":
    main()
