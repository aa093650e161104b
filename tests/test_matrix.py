"""The verification matrix: one set of rows, rendered the same way as text, Markdown and HTML."""

import html.parser

from patcher.verification import matrix

REPORT = {
    "base": {"forget_accuracy": 1.0, "paraphrase_accuracy": 0.9, "retain_accuracy": 0.8, "perplexity": 12.5},
    "formats": {
        "safetensors": {
            "forget_accuracy": 0.0,
            "paraphrase_accuracy": 0.05,
            "retain_accuracy": 0.78,
            "retain_ratio": 0.975,
            "recovery": None,
            "perplexity": 12.6,
            "perplexity_increase": 0.008,
            "passed": True,
            "failures": [],
        },
        "nf4": {
            "forget_accuracy": 0.25,
            "paraphrase_accuracy": 0.1,
            "retain_accuracy": 0.7,
            "retain_ratio": 0.875,
            "recovery": 0.25,
            "perplexity": 13.0,
            "perplexity_increase": 0.04,
            "passed": False,
            "failures": ["forget 0.250 > 0.05", "recovery 0.250 > 0.05"],
        },
    },
    "attacks": {
        "relearn": {
            "forget_accuracy": 0.1,
            "retain_accuracy": 0.75,
            "description": "fine-tuning on other text",
            "budget": {"steps": 50, "lr": 0.0001},
            "passed": False,
            "failures": ["forget 0.100 > 0.05"],
        }
    },
}


class TableCells(html.parser.HTMLParser):
    """Each <tr>'s cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        self.in_cell = self.in_cell and tag not in ("td", "th")

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def test_rows_hold_base_formats_and_attacks_in_report_order():
    rows = matrix.rows(REPORT)
    assert [row.label for row in rows] == ["base", "safetensors", "nf4", "attack: relearn"]
    assert rows[2].values == [0.25, 0.1, 0.7, 0.875, 0.25, 13.0, 0.04]
    assert rows[2].verdict == "FAIL: forget 0.250 > 0.05; recovery 0.250 > 0.05"
    assert rows[3].values == [0.1, None, 0.75, *[None] * 4]  # the figures the attack measured


def test_perplexity_columns_only_when_measured():
    without = {**REPORT, "base": {k: v for k, v in REPORT["base"].items() if k != "perplexity"}}
    assert len(matrix.columns(without)) == len(matrix.columns(REPORT)) - 2
    assert "ppl" not in matrix.as_text(without) and "ppl" in matrix.as_text(REPORT)


def test_text_markdown_and_html_show_the_same_cells():
    lines = [line for line in matrix.as_markdown(REPORT) if "---" not in line]
    markdown = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    parser = TableCells()
    parser.feed(matrix.as_html(REPORT))
    assert len(markdown) == len(parser.rows) == 1 + len(matrix.rows(REPORT))
    for md, cells in zip(markdown, parser.rows, strict=True):
        assert md[:-1] == cells[:-1]  # every cell but the verdict, whose markup differs
    assert markdown[3][-1] == "**FAIL**: forget 0.250 > 0.05; recovery 0.250 > 0.05"
    assert parser.rows[3][-1] == "FAIL: forget 0.250 > 0.05; recovery 0.250 > 0.05"

    text = matrix.as_text(REPORT).splitlines()
    assert len(text) == 2 + len(matrix.rows(REPORT)) + 1  # header and rule first, the attack's budget last
    assert text[-1] == "attack relearn: fine-tuning on other text; budget: steps 50, lr 0.0001"
    assert "<p>attack relearn: fine-tuning on other text; budget: steps 50, lr 0.0001</p>" in matrix.as_html(REPORT)
    nf4 = text[4].split()
    assert nf4[:8] == ["nf4", "0.250", "0.100", "0.700", "0.875", "0.250", "13.000", "0.040"]
    assert text[3].split()[-1] == "pass" and " -" in text[2]  # the base: no ratio, no verdict
