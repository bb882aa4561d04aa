#!/usr/bin/env python
"""Cached vs uncached greedy captioning speed of PalmE at the reference's default configuration.

    python benchmarks/benchmark_generation.py [--new-tokens 128] [--batch-sizes 1 4] [--repeats 2]

For each batch size, prints tokens/s with the KV cache (self-attention keys/values per layer, image keys/values
computed once; `DynamicCache` and `StaticCache`) and without it (every step recomputes the image encoder and the
whole sequence), the speed-up, and whether all three produced the same ids. Random weights: speed does not depend on
them; `min_new_tokens` makes every run generate all tokens. Times are the best of `--repeats` runs.
"""

import argparse
import time

import torch

from palme_hf import PalmEConfig, PalmEForConditionalGeneration


def tokens_per_second(model, inputs, new_tokens, repeats, **generate_kwargs):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **generate_kwargs
        )
        best = min(best, time.perf_counter() - start)
    assert output.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    return output, output.shape[0] * new_tokens / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = PalmEConfig()  # the reference defaults: 256px images, 6+6 layers of width 512, 20000 tokens
    model = PalmEForConditionalGeneration(config).to(args.device, dtype).eval()
    print(
        f"device={args.device} dtype={args.dtype} prompt={args.prompt_length} new_tokens={args.new_tokens} "
        f"threads={torch.get_num_threads()} (tokens/s, best of {args.repeats})"
    )
    print(f"{'batch':>5} {'cached':>9} {'static':>9} {'uncached':>9} {'speed-up':>9}  same ids")
    for batch_size in args.batch_sizes:
        inputs = {
            "pixel_values": torch.rand(batch_size, 3, 256, 256, device=args.device, dtype=dtype),
            "input_ids": torch.randint(
                0, config.text_config.vocab_size, (batch_size, args.prompt_length), device=args.device
            ),
        }
        with torch.inference_mode():
            tokens_per_second(model, inputs, 4, 1)  # warm-up
            cached_ids, cached = tokens_per_second(model, inputs, args.new_tokens, args.repeats)
            static_ids, static = tokens_per_second(
                model, inputs, args.new_tokens, args.repeats, cache_implementation="static"
            )
            uncached_ids, uncached = tokens_per_second(model, inputs, args.new_tokens, args.repeats, use_cache=False)
        same = torch.equal(cached_ids, uncached_ids) and torch.equal(static_ids, uncached_ids)
        print(f"{batch_size:>5} {cached:>9.1f} {static:>9.1f} {uncached:>9.1f} {cached / uncached:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
