#!/usr/bin/env python
"""Cached vs uncached greedy captioning speed of PalmE at the reference's default configuration.

    python benchmarks/benchmark_generation.py [--new-tokens 128] [--batch-size 1] [--repeats 3]

Prints tokens/s with the KV cache (self-attention keys/values per layer, image keys/values computed once) and
without it (every step recomputes the image encoder and the whole sequence), and the speed-up. Random weights: speed
does not depend on them. min_new_tokens forces all tokens to be generated.
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
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    assert generated == new_tokens, generated
    return output, output.shape[0] * new_tokens / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    config = PalmEConfig()  # the reference defaults: 256px images, 6+6 layers of width 512, 20000 tokens
    model = PalmEForConditionalGeneration(config).to(args.device, getattr(torch, args.dtype)).eval()
    inputs = {
        "pixel_values": torch.rand(args.batch_size, 3, 256, 256, device=args.device, dtype=getattr(torch, args.dtype)),
        "input_ids": torch.randint(0, config.text_config.vocab_size, (args.batch_size, args.prompt_length),
                                   device=args.device),
    }
    with torch.inference_mode():
        tokens_per_second(model, inputs, 4, 1)  # warm-up
        cached_ids, cached = tokens_per_second(model, inputs, args.new_tokens, args.repeats, use_cache=True)
        static_ids, static = tokens_per_second(
            model, inputs, args.new_tokens, args.repeats, cache_implementation="static"
        )
        uncached_ids, uncached = tokens_per_second(model, inputs, args.new_tokens, args.repeats, use_cache=False)
    print(f"device={args.device} dtype={args.dtype} batch={args.batch_size} prompt={args.prompt_length} "
          f"new_tokens={args.new_tokens} threads={torch.get_num_threads()}")
    print(f"cached (DynamicCache): {cached:8.1f} tokens/s")
    print(f"cached (StaticCache):  {static:8.1f} tokens/s")
    print(f"uncached:              {uncached:8.1f} tokens/s")
    print(f"speed-up (dynamic cache vs uncached): {cached / uncached:.1f}x")
    print(f"same ids with and without the cache: {torch.equal(cached_ids, uncached_ids) and torch.equal(static_ids, uncached_ids)}")


if __name__ == "__main__":
    main()
