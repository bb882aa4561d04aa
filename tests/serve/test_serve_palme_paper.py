"""`make serve` serves the shipped paper-layout captioner (palme_hf/palme_paper), and the README's client calls, the
`openai` client's and curl's, run as the README shows them, get the caption `generate()` gives, which is the image's
true caption."""

import json
import os
import subprocess
import sys

import PIL.Image
import pytest

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import generate_captions
from palme_hf.cli import PAPER_CAPTIONER

from helpers import SAMPLE_IMAGES, sample_captions
from serving import free_port, launch_server, stop_server
from test_docs import README, ROOT, page_blocks

SECTION = "Serving the paper's PaLM-E"
README_URL = "http://127.0.0.1:8000"  # make serve's default port


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """`make serve` on a free port, with the environment these tests run in."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("log") / "make_serve.log")
    serve_venv = os.path.dirname(os.path.dirname(sys.executable))
    command = ["make", "--no-print-directory", "serve", f"SERVE_PORT={port}", f"SERVE_VENV={serve_venv}"]
    process, url = launch_server(command, port, log_path, cwd=ROOT)
    with open(log_path) as handle:
        assert f'Serving palme_hf/palme_paper as model "palme" at {url}/v1' in handle.read()
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def expected() -> str:
    model = PalmEForConditionalGeneration.from_pretrained(PAPER_CAPTIONER).eval()
    processor = PalmEProcessor.from_pretrained(PAPER_CAPTIONER)
    caption = generate_captions(model, processor, [PIL.Image.open(os.path.join(SAMPLE_IMAGES, "held_out_00.png"))])
    assert caption == [sample_captions()["held_out_00.png"]]
    return caption[0]


def readme_code(language: str, base_url: str) -> str:
    """The README section's one block of `language`, calling `base_url` instead of make serve's default."""
    (code,) = [
        block["code"] for block in page_blocks(README) if block["heading"] == SECTION and block["language"] == language
    ]
    assert README_URL in code
    return code.replace(README_URL, base_url)


def test_the_readme_openai_client_call_gets_the_caption(base_url, expected):
    run = subprocess.run(
        [sys.executable, "-c", readme_code("python", base_url)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == f"{expected}\n"


def test_the_readme_curl_call_gets_the_caption(base_url, expected):
    code = readme_code("bash", base_url)
    curl = code[code.index("curl ") :]  # after `make serve`, which the fixture runs
    run = subprocess.run(["bash", "-c", curl], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["choices"][0]["message"]["content"] == expected
