#!/usr/bin/env python
"""Convert a zeta `PalmE` checkpoint into a folder that `PalmEForConditionalGeneration.from_pretrained` loads.

    python conversion/convert_zeta_palme.py --checkpoint CKPT.pt --kwargs KWARGS.json --output DIR

CKPT.pt is `torch.save(model.state_dict())` of a `zeta.models.PalmE`, read with `weights_only=True`; KWARGS.json is
the JSON object of keyword arguments it was built with (missing keys take zeta's defaults). The folder gets
safetensors weights, config.json, generation_config.json and the modelling code for `trust_remote_code=True`.
The checkpoint may also be a `.safetensors` file; float16 and bfloat16 checkpoints are saved in their dtype unless
`--dtype` says otherwise.
A checkpoint with missing, unexpected or wrongly shaped tensors, or kwargs zeta's PalmE does not take, is refused
with a non-zero exit and a message naming them; so is a truncated or unreadable checkpoint or kwargs file.

A non-empty DIR is refused (and left as it was) unless `--overwrite` is given, which replaces its contents and
nothing else: an empty path, the current folder, and a DIR that holds the checkpoint or the kwargs file are refused.
A DIR that is a link to a folder stays a link; its target gets the model. The model is written into a temporary
folder beside DIR and renamed to DIR at the end, so a failed or stopped (Ctrl-C, SIGTERM) conversion leaves no
half-written folder.
"""

import argparse
import sys

import torch

from palme_hf.conversion_zeta import convert_zeta_palme_checkpoint
from palme_hf.io_palme import check_output_dir, exit_on_sigterm, one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="zeta PalmE state dict saved with torch.save")
    parser.add_argument("--kwargs", required=True, help="JSON object of the PalmE constructor keyword arguments")
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it is not empty (everything in it is deleted)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the saved weights (default: the checkpoint's)",
    )
    args = parser.parse_args(argv)
    try:
        # The checkpoint and kwargs files are inputs, which no output may replace.
        check_output_dir(args.output, args.overwrite, {"--checkpoint": args.checkpoint, "--kwargs": args.kwargs})
        with exit_on_sigterm():
            convert_zeta_palme_checkpoint(
                args.checkpoint,
                args.kwargs,
                args.output,
                overwrite=args.overwrite,
                dtype=args.dtype and getattr(torch, args.dtype),
            )
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
