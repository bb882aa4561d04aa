"""The README and the documentation pages (docs/*.md) hold what is true: their Python examples run as written, their
links resolve, and their tables are the data they show.

The convention, for whoever adds to README.md or a page of docs/:
- Every block fenced ```python is a test: it runs here, on its own (a fresh namespace: import what it uses, define what
  it needs; nothing carries over from the blocks before it), in an empty temporary working directory, offline
  (HF_HUB_OFFLINE=1), and must finish in seconds on a CPU. Build small inputs in the block (an image from
  `palme_hf.synthetic_shapes`, `torch.rand(...)`) and load models from the shipped captioner
  (`palme_hf.cli.DEFAULT_CAPTIONER`) or from a small config, never from the network.
- A block that truly needs the network, a GPU or a file nobody has (pushing to the Hub, a reference checkpoint) is
  shown, not run: the line just above its fence is `<!-- no-run: why -->`, which neither GitHub nor the site shows.
  Keep such blocks to the lines that need it, and rare.
- Blocks fenced otherwise (```bash, ```text, plain ```) are not run.
- A test fails with the page, the block's heading and line in its id (`test_docs_block[README-Quickstart-L24]`),
  and the traceback points into the page. The block tests are marked slow (each builds or loads models): `make test`
  runs them, `pytest -m "not slow"` checks everything else (fences, links, tables).
"""

import ast
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import unicodedata

import pytest

import palme_hf
from palme_hf.cli import PAPER_CAPTIONER
from palme_hf.embodied_world import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
PAGES = [README] + sorted(glob.glob(os.path.join(DOCS, "*.md")))
FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*$")
NO_RUN = re.compile(r"^<!-- no-run: (\S.*\S) -->$")
# [text](target) and ![alt](target), outside code; the target up to the first space or closing bracket
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_LINES = 150
MAX_NO_RUN_BLOCKS = 5
MIN_TEMPLATE_TEXT = 15


def page_name(path: str) -> str:
    return os.path.relpath(path, ROOT)


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


def page_blocks(path: str) -> list[dict]:
    """Each fenced block of the page at `path`: its language, heading, first line number, code, and the reason it is
    not run (`no_run`, None for a block that runs)."""
    blocks, heading, block = [], "top", None
    lines = read_lines(path)
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if block is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if fence:
                language, option = fence.groups()
                if option is not None:
                    raise ValueError(
                        f"{page_name(path)} line {number}: fence option {option!r}; mark a block that is not run with "
                        "`<!-- no-run: why -->` on the line above its fence."
                    )
                marker = NO_RUN.match(lines[number - 2]) if number > 1 else None
                block = {"language": language, "heading": heading, "start": number + 1, "lines": []}
                block["no_run"] = marker.group(1) if marker else None
            elif line.startswith("<!-- no-run") and not (
                NO_RUN.match(line) and number < len(lines) and lines[number] == "```python"
            ):
                raise ValueError(
                    f"{page_name(path)} line {number}: a no-run marker is `<!-- no-run: why -->`, just above a "
                    "```python fence."
                )
        elif line == "```":
            block["code"] = "\n".join(block.pop("lines")) + "\n"
            blocks.append(block)
            block = None
        else:
            block["lines"].append(line)
    if block is not None:
        raise ValueError(f"{page_name(path)}: the block opened at line {block['start'] - 1} is never closed.")
    return blocks


def python_blocks(runnable: bool) -> list[tuple[str, str, int, str]]:
    """(page, heading, first line number, code) of every ```python block of the README and the pages that runs (or,
    with `runnable=False`, that is marked no-run)."""
    found = []
    for path in PAGES:
        for block in page_blocks(path):
            if block["language"] == "python" and (block["no_run"] is None) == runnable:
                found.append((path, block["heading"], block["start"], block["code"]))
    return found


BLOCKS = python_blocks(runnable=True)


def block_id(path: str, heading: str, start: int) -> str:
    page = os.path.splitext(os.path.basename(path))[0]
    return f"{page}-{re.sub(r'[^A-Za-z0-9]+', '-', heading).strip('-')[:40]}-L{start}"


def test_every_page_has_runnable_examples_where_it_shows_code():
    pages_with_blocks = {path for path, _, _, _ in BLOCKS}
    assert README in pages_with_blocks
    assert len(BLOCKS) >= 12
    for name in ("getting-started", "model", "processing", "blocks", "towers", "training", "numerics"):
        assert os.path.join(DOCS, f"{name}.md") in pages_with_blocks, name


def test_no_run_blocks_are_rare_and_say_why():
    not_run = python_blocks(runnable=False)
    assert 0 < len(not_run) <= MAX_NO_RUN_BLOCKS
    for path, _, start, _ in not_run:
        reason = NO_RUN.match(read_lines(path)[start - 3]).group(1)
        assert len(reason.split()) >= 3, f"{page_name(path)} line {start - 2}: say why the block is not run"


def test_a_fence_option_or_a_malformed_marker_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```python no-run\nx = 1\n```\n")
    with pytest.raises(ValueError, match="line 3: fence option 'no-run'"):
        page_blocks(str(page))
    page.write_text("# Page\n\n<!-- no-run -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="line 3: a no-run marker"):
        page_blocks(str(page))
    page.write_text("# Page\n\n<!-- no-run: needs the Hub -->\n```python\nx = 1\n```\n")
    assert page_blocks(str(page))[0]["no_run"] == "needs the Hub"


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, heading, start, code",
    BLOCKS,
    ids=[block_id(path, heading, start) for path, heading, start, _ in BLOCKS],
)
def test_docs_block(path, heading, start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # line numbers of the traceback are the page's
    program = compile("\n" * (start - 1) + code, path, "exec")
    exec(program, {"__name__": "__docs__"})


def test_the_readme_is_short():
    assert len(read_lines(README)) <= MAX_README_LINES


def slugify(heading: str) -> str:
    """A heading's anchor, as Python-Markdown's `toc` (the site) makes it; GitHub's agrees for plain headings."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def page_anchors(path: str) -> set[str]:
    """The anchors of a page: its headings', and on the API page the objects mkdocstrings renders (`palme_hf.Name`)."""
    anchors = set()
    in_code = False
    for line in read_lines(path):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(slugify(line.lstrip("#").strip()))
        elif line.startswith("::: "):
            anchors.add(line[4:].strip())
    return anchors


def page_links(path: str) -> list[tuple[int, str]]:
    """(line number, target) of each link and image of a page, outside code blocks and code spans."""
    links, in_code = [], False
    for number, line in enumerate(read_lines(path), start=1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            text = re.sub(r"``.*?``|`[^`]*`", "", line)
            links += [(number, target) for target in LINK.findall(text)]
    return links


@pytest.mark.parametrize("path", PAGES, ids=[page_name(path) for path in PAGES])
def test_every_link_resolves(path):
    """Links to files of the repository point at files that exist, and anchors at headings of the page they name.
    Links to other sites are checked only for their form: the tests are offline."""
    for number, target in page_links(path):
        where = f"{page_name(path)} line {number}: {target}"
        if re.match(r"^[a-z]+:", target):
            assert target.startswith("https://"), where
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        assert os.path.exists(linked), f"{where}: no such file"
        if anchor:
            assert anchor in page_anchors(linked), f"{where}: no such heading"


def test_the_readme_links_to_the_pages_and_shows_the_picture():
    targets = {target for _, target in page_links(README)}
    assert "docs/images/captions.png" in targets
    for path in PAGES[1:]:
        if os.path.basename(path) not in ("blocks.md", "captioner.md", "conversion.md", "numerics.md"):
            continue
        assert any(target.split("#")[0] == page_name(path) for target in targets), page_name(path)


def test_slugify_makes_the_anchors_mkdocs_and_github_make():
    assert slugify("LoRA with new words: save, reload, merge") == "lora-with-new-words-save-reload-merge"
    assert slugify("Train in the PaLM-E paper's prefix mode") == "train-in-the-palm-e-papers-prefix-mode"
    assert slugify("The Auto classes and loading without palme_hf") == "the-auto-classes-and-loading-without-palme_hf"


def test_every_page_is_in_the_site_navigation():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as handle:
        navigation = set(re.findall(r"^  - [^:]+: (\S+\.md)$", handle.read(), flags=re.MULTILINE))
    assert navigation == {os.path.basename(path) for path in PAGES[1:]}


def test_the_api_reference_shows_every_public_name():
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as handle:
        shown = re.findall(r"^::: palme_hf\.(\w+)$", handle.read(), flags=re.MULTILINE)
    assert sorted(shown) == sorted(palme_hf.__all__)


# Public names of palme_hf without a docstring, in modules other engineers were editing when the documentation site
# was built (issue 21): remove a name once its docstring is written. No other name may lack one.
AWAITING_DOCSTRINGS = {
    "cli.main",
    "modeling_palme.PalmEForCausalLM.from_pretrained",
    "modeling_palme.PalmEForCausalLM.get_input_embeddings",
    "modeling_palme.PalmEForCausalLM.get_output_embeddings",
    "modeling_palme.PalmEForCausalLM.set_input_embeddings",
    "modeling_palme.PalmEForConditionalGeneration.get_image_features",
    "modeling_palme.PalmEForConditionalGeneration.get_input_embeddings",
    "modeling_palme.PalmEForConditionalGeneration.get_output_embeddings",
    "modeling_palme.PalmEForConditionalGeneration.prepare_inputs_for_generation",
    "modeling_palme.PalmEForConditionalGeneration.set_input_embeddings",
    "modeling_palme.PalmEModel.get_input_embeddings",
    "modeling_palme.PalmEModel.set_input_embeddings",
    "modeling_palme.PalmEPreTrainedModel",
    "modeling_palme.PalmEPreTrainedModel.create_masks_for_generate",
    "modeling_palme.PalmETextDecoderLayer.forward",
    "modeling_palme.PalmETextModel.get_input_embeddings",
    "modeling_palme.PalmETextModel.set_input_embeddings",
    "modeling_palme.PalmEVisionEncoderLayer.forward",
    "processing_palme.PalmEProcessor.prepare_inputs_layout",
    "processing_palme.PalmEProcessor.replace_image_token",
    "processing_palme.PalmEProcessor.unused_input_names",
}


def public_names_without_docstrings() -> set[str]:
    """`module.name` (and `module.Class.member`) of each public function, class, method and property that palme_hf's
    modules define without a docstring."""
    missing = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "palme_hf", "*.py"))):
        module_name = os.path.splitext(os.path.basename(path))[0]
        module = importlib.import_module(f"palme_hf.{module_name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if (inspect.isfunction(value) or inspect.isclass(value)) and not value.__doc__:
                missing.add(f"{module_name}.{name}")
            if not inspect.isclass(value):
                continue
            for member_name, member in vars(value).items():
                function = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                if not member_name.startswith("_") and inspect.isfunction(function) and not function.__doc__:
                    missing.add(f"{module_name}.{name}.{member_name}")
    return missing


def test_public_names_have_docstrings():
    assert public_names_without_docstrings() <= AWAITING_DOCSTRINGS


def message_text(node: ast.expr) -> str:
    """The text of a message expression, with `…` for each value formatted in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(message_text(value) for value in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return message_text(node.left) + message_text(node.right)
    return "…"


def raised_messages(sources: list[str]) -> list[tuple[str, int, str]]:
    """(file, line, message) of each exception raised in `sources` with a message."""
    messages = []
    for source in sources:
        with open(source, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                messages.append((page_name(source), node.lineno, message_text(node.exc.args[0])))
    return messages


def message_pattern(message: str) -> re.Pattern:
    """Matches `message`'s text between its `…` placeholders, in order."""
    pieces = [piece.strip() for piece in message.split("…") if piece.strip()]
    return re.compile(".*".join(re.escape(piece) for piece in pieces), flags=re.DOTALL)


def is_raised(listed: str, raised: str) -> bool:
    """Whether the message `listed` on the page is (part of) the message `raised` with values left out as `…`, or an
    instance of it, with values filled in."""
    if message_pattern(listed).search(raised):
        return True
    # a message that is mostly values (`f"{where}: {error}"`) is an instance of too much to count
    return len(raised.replace("…", "").strip()) >= MIN_TEMPLATE_TEXT and bool(message_pattern(raised).search(listed))


def troubleshooting_messages() -> list[str]:
    """The messages the troubleshooting page lists: the code spans of each table row's first cell."""
    messages = []
    for line in read_lines(os.path.join(DOCS, "troubleshooting.md")):
        if line.startswith("| `"):
            first_cell = line[2:].split(" | ", 1)[0]
            messages += re.findall(r"`` (.+?) ``|`([^`]+)`", first_cell)
    return [double or single for double, single in messages]


def test_the_troubleshooting_page_lists_messages_the_package_raises():
    """Each message the page lists is one the code raises (the values formatted in may differ)."""
    sources = glob.glob(os.path.join(ROOT, "palme_hf", "*.py")) + glob.glob(os.path.join(ROOT, "examples", "*.py"))
    raised = [message for _, _, message in raised_messages(sources)]
    listed = troubleshooting_messages()
    assert len(listed) >= 100
    for message in listed:
        assert any(is_raised(message, text) for text in raised), f"not raised anywhere: {message}"


def test_the_troubleshooting_page_lists_every_error_of_the_model_and_its_inputs():
    """Every message that the configuration, the models and the processing raise is on the page."""
    listed = troubleshooting_messages()
    modules = ("configuration_palme", "modeling_palme", "processing_palme", "layers_palme", "towers_palme")
    sources = [os.path.join(ROOT, "palme_hf", f"{module}.py") for module in modules]
    for source, line, message in raised_messages(sources):
        assert any(is_raised(text, message) for text in listed), f"{source} line {line}: {message}"


def markdown_table(path: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the table whose header row starts with `header_start`, header row included."""
    lines = read_lines(path)
    start = next(number for number, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]


def test_the_speed_table_is_the_benchmark_data():
    with open(os.path.join(DOCS, "data", "speed.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    table = markdown_table(os.path.join(DOCS, "speed.md"), "| setting | unit |")
    assert table[0] == ["setting", "unit"] + data["models"]
    assert table[1:] == [[setting, unit] + cells for setting, unit, cells in data["rows"]]


def load_figures_script():
    spec = importlib.util.spec_from_file_location("make_figures", os.path.join(DOCS, "make_figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_speed_plot_shows_the_tables_ratios():
    """The plot's bars, each model's rate over Llama's, are the ratios the table prints (to its two decimals)."""
    make_figures = load_figures_script()
    with open(make_figures.SPEED_JSON, encoding="utf-8") as handle:
        data = json.load(handle)
    settings, ratios = make_figures.speed_ratios(data)
    assert "decode, batch 8, 1024-token prompts, dynamic cache, fp32" in settings
    assert set(ratios) == {"standard", "parallel", "hierarchical", "hierarchical-w128"}
    rows = {setting: cells for setting, _, cells in data["rows"]}
    for name, values in ratios.items():
        for setting, ratio in zip(settings, values):
            cell = rows[setting][data["models"].index(name)]
            if ratio is None:
                assert cell == ""
            else:
                printed = float(re.search(r"\(([\d.]+)x", cell).group(1))
                assert abs(ratio - printed) <= 0.006, (name, setting, ratio, cell)


def test_the_robustness_table_is_the_evaluation_data():
    """The captioner page's table holds the first run's figures and those of the shipped captioner's
    eval_results.json, in order, as the chart draws them."""
    make_figures = load_figures_script()
    with open(make_figures.EVAL_RESULTS, encoding="utf-8") as handle:
        now = list(json.load(handle)["robustness"].values())
    with open(make_figures.FIRST_RUN, encoding="utf-8") as handle:
        before = list(json.load(handle)["robustness"].values())
    table = markdown_table(os.path.join(DOCS, "captioner.md"), "| condition |")
    assert table[0] == ["condition", "before (first run)", "now"]
    assert [float(value) for _, cell, _ in table[1:] for value in cell.split(" / ")] == before
    assert [float(value) for _, _, cell in table[1:] for value in cell.split(" / ")] == now


def test_the_paper_captioner_table_is_its_evaluation_data():
    """The captioner page's table of the shipped paper-layout captioner holds its eval_results.json."""
    with open(os.path.join(PAPER_CAPTIONER, "eval_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    table = markdown_table(os.path.join(DOCS, "captioner.md"), "| held-out renders |")
    assert table == [
        ["held-out renders", "exact match"],
        [f"{results['num_samples']}, clean", f"{results['exact_match']:.3f}"],
        *([f"{results['robustness_samples']}, {name}", f"{results['robustness'][name]:.3f}"]
          for name in ("clean", "JPEG q75", "noise sigma=5/255")),
    ]  # fmt: skip


def test_the_pictures_the_pages_show_are_committed():
    for path in PAGES:
        for _, target in page_links(path):
            if target.endswith(".png"):
                picture = os.path.normpath(os.path.join(os.path.dirname(path), target))
                assert os.path.getsize(picture) < 200_000, f"{target}: keep committed pictures small"


def embodied_runs_rows(runs: dict) -> list[list[str]]:
    """The rows the embodied page shows for `runs` (of docs/data/embodied.json): name, inputs, tasks ("all" or their
    names), training examples, steps, and the three scores to three decimals ("–" for one not measured)."""
    rows = []
    for name, run in runs.items():
        tasks = run.get("tasks", list(TASKS))
        scores = [run.get(key) for key in ("question_accuracy", "plan_success", "next_step_accuracy")]
        rows.append(
            [name, run["inputs"], "all" if tasks == list(TASKS) else ", ".join(tasks), str(run["train_samples"]),
             str(run["train_steps"]), *("–" if score is None else f"{score:.3f}" for score in scores)]
        )  # fmt: skip
    return rows


def test_the_embodied_tables_are_the_run_data():
    """The embodied page's tables hold the scores of the runs recorded in docs/data/embodied.json (each run's
    eval_results.json, and the closed loop's reports), to three decimals (the loop's success rate to two)."""
    with open(os.path.join(DOCS, "data", "embodied.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    page = os.path.join(DOCS, "embodied.md")
    columns = [
        "inputs", "tasks", "training examples", "steps", "question accuracy", "plan success", "next-step accuracy"
    ]  # fmt: skip
    for first_cell, runs in (
        ("run", data["runs"]), ("earlier run", data["earlier_runs"]), ("first run", data["first_runs"]),
        ("data run", data["data_efficiency_runs"]),
    ):  # fmt: skip
        table = markdown_table(page, f"| {first_cell} | inputs |")
        assert table[0] == [first_cell, *columns]
        assert table[1:] == embodied_runs_rows(runs)
    loop = markdown_table(page, "| model | inputs | episodes |")
    assert loop[0] == ["model", "inputs", "episodes", "step budget", "a refused step", "success rate"]
    assert loop[1:] == [
        [
            name,
            report["inputs"],
            str(report["episodes"]),
            str(report["max_steps"]),
            "is named, the model asked again" if report.get("replan") else "ends the episode",
            f"{report['success_rate']:.2f}",
        ]
        for name, report in data["loops"].items()
    ]


def test_the_embodied_card_shows_the_data_efficiency_runs():
    """The shipped planner's model card shows each data-efficiency run of docs/data/embodied.json, its referral and
    next-step accuracy by inputs (rows) and training examples (columns)."""
    with open(os.path.join(DOCS, "data", "embodied.json"), encoding="utf-8") as handle:
        runs = json.load(handle)["data_efficiency_runs"]
    table = markdown_table(os.path.join(ROOT, "palme_hf", "embodied", "README.md"), "| inputs | 500 examples |")
    sizes = (500, 5000, 50000)
    assert table[0] == ["inputs", "500 examples", "5000 examples", "50 000 examples"]
    names = {"state": "state", "objects": "objects", "image+state": "image and state"}
    expected = []
    for inputs, name in names.items():
        by_size = {run["train_samples"]: run for run in runs.values() if run["inputs"] == inputs}
        cells = [
            f"{by_size[size]['referral_accuracy']:.3f} / {by_size[size]['next_step_accuracy']:.3f}" for size in sizes
        ]
        expected.append([name, *cells])
    assert table[1:] == expected
