"""Pieces of the report that decide what a reader is told."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.report.content import boundary, describe_distribution, param_changes
from search.report.render import Code, Heading, Image, Table, Text, to_html, to_markdown
from spaces.mlp import LECTURE, SEED

D = optuna.distributions


@pytest.mark.parametrize("value, distribution, expected", [
    (1, D.IntDistribution(1, 4), "lower"),
    (4, D.IntDistribution(1, 4), "upper"),
    (2, D.IntDistribution(1, 4), None),
    (1.1e-4, D.FloatDistribution(1e-4, 1e-2, log=True), "lower"),
    (1e-3, D.FloatDistribution(1e-4, 1e-2, log=True), None),
    # 0.59 of [0.05, 0.6] is within 5% of the top on a linear scale
    (0.59, D.FloatDistribution(0.05, 0.6), "upper"),
    ("both", D.CategoricalDistribution(["none", "both"]), None),
])
def test_boundary(value, distribution, expected):
    assert boundary(value, distribution) == expected


def test_describe_distribution():
    assert describe_distribution(D.IntDistribution(16, 1024, log=True)) == (
        "int in [16, 1024], log scale")
    assert describe_distribution(D.CategoricalDistribution(["a", "b"])) == "one of a, b"


def test_param_changes_lists_only_what_differs():
    changes = param_changes(LECTURE, SEED)
    assert "widths [512, 256] → [512, 256, 128]" in changes
    assert not any(c.startswith("optimizer") for c in changes)


def test_renderers_escape_and_embed(tmp_path: Path):
    png = tmp_path / "figures" / "x.png"
    png.parent.mkdir()
    png.write_bytes(b"\\x89PNG fake")
    blocks = [Heading("T <1>", 1), Text("a **bold** and `code` & <b>"),
              Table(["h"], [["a|b"]]), Code("x < y"), Image(png, "cap")]
    md = to_markdown(blocks, tmp_path)
    assert "# T <1>" in md and r"a\|b" in md and "![cap](figures/x.png)" in md
    page = to_html(blocks, "t")
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert "&lt;b&gt;" in page and "x &lt; y" in page and "data:image/png;base64," in page
