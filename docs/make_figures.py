#!/usr/bin/env python
"""Draws the documentation's pictures into docs/images (`make figures`; needs the `docs` extra, for matplotlib).

    python docs/make_figures.py                               # all three
    python docs/make_figures.py --speed-json results.json     # the speed plot from a fresh benchmark run

- `captions.png`: the sample images of examples/images with the shipped captioner's greedy captions under them
  (captioned now, by `palme_hf/captioner`); a caption that differs from the true one (captions.json) is drawn in red
  with the true caption beside it.
- `robustness.png`: exact match under each corruption, from `palme_hf/captioner/eval_results.json` (the shipped
  captioner) and `docs/data/robustness_first_run.json` (the first training run).
- `speed.png`: each block type's rate relative to Llama in every tokens/s row of `docs/data/speed.json`, the table of
  docs/speed.md, or of a JSON that `benchmarks/benchmark_generation.py --json` wrote.
"""

import argparse
import json
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES_DIR = os.path.join(ROOT, "docs", "images")
SAMPLE_IMAGES = os.path.join(ROOT, "examples", "images")
EVAL_RESULTS = os.path.join(ROOT, "palme_hf", "captioner", "eval_results.json")
FIRST_RUN = os.path.join(ROOT, "docs", "data", "robustness_first_run.json")
SPEED_JSON = os.path.join(ROOT, "docs", "data", "speed.json")
# No software version in the files, so that drawing them again with another matplotlib changes nothing.
PNG_METADATA = {"Software": None}


def sample_captions() -> list[tuple[str, str, str]]:
    """`(image path, the shipped captioner's caption, the true caption)` for each sample image, in file order."""
    from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
    from palme_hf.captioning import generate_captions
    from palme_hf.cli import DEFAULT_CAPTIONER

    with open(os.path.join(SAMPLE_IMAGES, "captions.json"), encoding="utf-8") as handle:
        truth = json.load(handle)
    paths = [os.path.join(SAMPLE_IMAGES, name) for name in sorted(truth)]
    model = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER).eval()
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    captions = generate_captions(model, processor, paths)
    return [(path, caption, truth[os.path.basename(path)]) for path, caption in zip(paths, captions)]


def speed_ratios(data: dict) -> tuple[list[str], dict[str, list[float | None]]]:
    """The tokens/s rows of a benchmark JSON that have a Llama figure, and for each PalmE model its rate divided by
    Llama's in each row (`None` where the row has no figure for it). Cells read as `"120.0 (0.98x)"`: the number
    before the bracket is the rate."""
    models = [name for name in data["models"] if name != "llama"]
    llama = data["models"].index("llama")
    settings, ratios = [], {name: [] for name in models}
    for setting, unit, cells in data["rows"]:
        rates = [float(cell.split(" ")[0]) if cell and not cell.endswith("x") else None for cell in cells]
        if unit != "tokens/s" or rates[llama] is None:
            continue
        settings.append(setting)
        for name in models:
            rate = rates[data["models"].index(name)]
            ratios[name].append(None if rate is None else rate / rates[llama])
    return settings, ratios


def draw_captions(path: str):
    import matplotlib.pyplot as plt
    from PIL import Image

    samples = sample_captions()
    columns = 4
    rows = (len(samples) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3.6 * rows))
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image_path, caption, truth) in zip(axes.flat, samples):
        axis.imshow(Image.open(image_path).convert("RGB"), interpolation="nearest")
        text = "\n".join(textwrap.wrap(caption, 28))
        if caption != truth:
            text += "\n(true: " + "\n".join(textwrap.wrap(truth, 28)) + ")"
        color = "black" if caption == truth else "firebrick"
        axis.text(0.5, -0.03, text, transform=axis.transAxes, ha="center", va="top", fontsize=11, color=color)
    right = sum(caption == truth for _, caption, truth in samples)
    figure.suptitle(
        f"The shipped captioner on held-out images, each with a combination never seen in training: "
        f"{right} of {len(samples)} exact"
    )
    figure.subplots_adjust(left=0.01, right=0.99, top=0.94, bottom=0.06, wspace=0.05, hspace=0.32)
    figure.savefig(path, dpi=80, metadata=PNG_METADATA)
    plt.close(figure)


def draw_robustness(path: str):
    import matplotlib.pyplot as plt

    with open(EVAL_RESULTS, encoding="utf-8") as handle:
        now = json.load(handle)["robustness"]
    with open(FIRST_RUN, encoding="utf-8") as handle:
        before = json.load(handle)["robustness"]
    conditions = list(now)
    positions = range(len(conditions))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    height = 0.4
    axis.barh([p + height / 2 for p in positions], [before[c] for c in conditions], height, label="first run")
    axis.barh([p - height / 2 for p in positions], [now[c] for c in conditions], height, label="shipped captioner")
    axis.set_yticks(list(positions), conditions)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("exact match on 200 held-out images")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    figure.suptitle("Robustness to corrupted images (examples/evaluate_captioner.py --seed 2)")
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata=PNG_METADATA)
    plt.close(figure)


def draw_speed(path: str, speed_json: str):
    import matplotlib.pyplot as plt

    with open(speed_json, encoding="utf-8") as handle:
        data = json.load(handle)
    settings, ratios = speed_ratios(data)
    figure, axis = plt.subplots(figsize=(10, 6.5))
    height = 0.8 / len(ratios)
    for index, (name, values) in enumerate(ratios.items()):
        offsets = [row + (index - (len(ratios) - 1) / 2) * height for row in range(len(settings))]
        present = [(offset, value) for offset, value in zip(offsets, values) if value is not None]
        axis.barh([offset for offset, _ in present], [value for _, value in present], height, label=name)
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set_yticks(range(len(settings)), ["\n".join(textwrap.wrap(setting, 40)) for setting in settings])
    axis.tick_params(axis="y", labelsize=10)
    axis.invert_yaxis()
    axis.set_xlabel("tokens/s relative to a matched Llama in the same run (1.0: as fast)")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(ratios), fontsize=10, frameon=False)
    title = f"PalmE's block types against Llama: {data['device']}, {data['threads']} threads"
    figure.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata=PNG_METADATA)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=IMAGES_DIR, help="folder of the PNGs (default: %(default)s)")
    parser.add_argument("--speed-json", default=SPEED_JSON, help="benchmark JSON to plot (default: %(default)s)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(args.output_dir, exist_ok=True)
    draw_captions(os.path.join(args.output_dir, "captions.png"))
    draw_robustness(os.path.join(args.output_dir, "robustness.png"))
    draw_speed(os.path.join(args.output_dir, "speed.png"), args.speed_json)
    print(f"wrote captions.png, robustness.png and speed.png into {args.output_dir}")


if __name__ == "__main__":
    main()
