"""The user-facing docs tell the truth about the demo model that `make run` serves: every example
prompt is one it can draw (its grammar, training/shapes.py), every sampling default they show is
the one in its config.json, and the shipped config names example prompts the service can show.
(docs/model.md is about the official weights and is not checked here.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from model.model_dir import example_prompts, read_config, sampling_defaults
from training import shapes

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DOCS = ["README.md", "docs/api.md", "docs/clients.md", "docs/deploy.md", "docs/reliability.md"]
PROMPT_PATTERNS = [
    r'"prompt": ?"([^"]*)"',                    # JSON bodies
    r'\bprompt="([^"]*)"',                      # Python keyword arguments (OpenAI SDK)
    r'star generate "([^"]*)"',                 # the CLI
    r'\.(?:generate|submit)\(f?"([^"]*)"',      # the Python client
]
DEMO = sampling_defaults("shapes")   # model names: cfg, top_k, top_p, temperature


def doc_prompts() -> list[tuple[str, str]]:
    found = []
    for name in SERVICE_DOCS:
        text = (ROOT / name).read_text()
        for pattern in PROMPT_PATTERNS:
            found += [(name, match) for match in re.findall(pattern, text)]
    return found


def test_the_grammar_check_knows_good_and_bad_prompts():
    assert shapes.parse_caption("a red circle on a blue background") == ("circle", "red", "blue")
    assert shapes.parse_caption("an orange star on a white background") is None   # not a colour it knows
    for bad in ("a green triangle", "a busy harbour", "a red circle on a red background",
                "an red circle on a blue background", "a red hexagon on a blue background"):
        assert shapes.parse_caption(bad) is None, bad


def test_every_example_prompt_in_the_docs_is_one_the_demo_model_can_draw():
    prompts = doc_prompts()
    assert len(prompts) >= 15, prompts            # the patterns still find the examples
    for placeholder in ("{c}", "{colour}"):       # f-strings of the docs, with each colour they use
        prompts = [(name, p.replace(placeholder, "red")) for name, p in prompts]
    bad = [(name, prompt) for name, prompt in prompts if shapes.parse_caption(prompt) is None]
    assert not bad, f"prompts the demo model cannot draw (grammar: {shapes.caption('SHAPE', 'COLOUR', 'COLOUR')}): {bad}"


def test_the_shipped_model_names_example_prompts_it_can_draw():
    examples = example_prompts("shapes")
    assert examples == list(shapes.EXAMPLE_PROMPTS) and len(examples) >= 3
    assert all(shapes.parse_caption(p) for p in examples)
    assert read_config("shapes")["example_prompts"] == examples
    page = (ROOT / "app/static/index.html").read_text()
    assert f'placeholder="{examples[0]}"' in page           # the page's prompt before GET /models answers


@pytest.mark.parametrize("doc", ["docs/api.md"])
def test_job_and_models_examples_show_the_demo_models_sampling_defaults(doc):
    """The job record's `request` (sampling fields left out) and `/models`' `sampling` examples."""
    text = (ROOT / doc).read_text()
    shown = re.findall(r'"guidance_scale": ([\d.]+), "top_k": (\d+), "top_p": ([\d.]+), "temperature": ([\d.]+)', text)
    assert len(shown) >= 2
    for values in shown:
        assert tuple(float(v) for v in values) == (DEMO["cfg"], DEMO["top_k"], DEMO["top_p"], DEMO["temperature"])


def test_every_doc_states_the_demo_defaults_where_it_shows_them():
    cli_lines = re.findall(r"guidance ([\d.]+), top-k (\d+), top-p ([\d.]+), temperature ([\d.]+)",
                           (ROOT / "docs/clients.md").read_text())
    assert cli_lines, "docs/clients.md shows `star generate`'s stderr"
    for values in cli_lines:
        assert tuple(float(v) for v in values) == (DEMO["cfg"], DEMO["top_k"], DEMO["top_p"], DEMO["temperature"])
    comments = re.findall(r"# ([\d.]+): the model's default", (ROOT / "docs/clients.md").read_text())
    assert comments and all(float(v) == DEMO["cfg"] for v in comments)
    for name in ("README.md", "docs/api.md", "docs/clients.md"):
        text = " ".join((ROOT / name).read_text().split())
        said = re.findall(r"`?shapes`? (?:\(`make run`\) )?recommends `?guidance(?:_scale)?`? ([\d.]+)", text)
        said += re.findall(r"for the demo model `shapes`: guidance ([\d.]+)", text)
        assert said, f"{name} does not state the demo model's default guidance"
        assert all(float(v) == DEMO["cfg"] for v in said), (name, said)
    for name in SERVICE_DOCS:   # no leftover of the old claim
        assert not re.search(r"guidance(?:_scale)?\W{0,4}3(?:\.0)?\b.{0,30}(?:model's )?default", (ROOT / name).read_text()), name
