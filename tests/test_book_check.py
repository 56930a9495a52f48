"""The browser check of the built book (analysis/book_check.py): each rule on a small
synthetic page, in the real headless Chromium where it is installed."""

from __future__ import annotations

import asyncio

import pytest

from analysis import book_check

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="120" height="60">'
       '<rect width="120" height="60" fill="#0072B2"/></svg>')


def _page(body: str, head: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><title>t</title>{head}</head><body>"
            f'<main><article class="bd-article" style="width:600px">{body}</article></main></body></html>')


PAGES = {
    "good.html": _page('<p>Fine.</p><figure><img src="chart.svg" alt="A blue bar the width of the chart">'
                       '<figcaption>Figure 1. One bar.</figcaption></figure>'
                       '<div style="overflow-x:auto;max-width:100%"><table style="width:500px">'
                       '<tr><th>fits its scroll box</th></tr></table></div>'
                       '<table><tr><th>narrow</th></tr></table>'),
    "uncaptioned.html": _page('<img src="chart.svg" alt="chart.svg">'),
    "scrolls.html": _page('<div style="overflow-x:auto;max-width:100%"><table style="width:1500px">'
                          '<tr><th>wide, in a scroll box</th></tr></table></div>'),
    "network.html": _page("<p>x</p>", head='<script src="https://cdn.example.invalid/lib.js"></script>'),
    "console.html": _page("<p>x</p><script>console.error('broken on purpose')</script>"),
    "zero.html": _page('<img src="chart.svg" style="width:0;height:0" alt="flat chart">'),
    "missing-image.html": _page('<img src="nowhere.svg" alt="missing">'),
    "glue.html": _page("<p>The value is {glue:text}`speed` today.</p>"),
    "wide.html": _page('<table style="width:1500px"><tr><th>cut off</th></tr></table>'),
}


def test_rules_on_recorded_pages():
    """The rules alone, on what a page reported (no browser)."""
    seen = {"text": "a {glue:text}`x` b", "column_right": 800.0,
            "charts": [{"what": "a.svg", "width": 0, "height": 10, "loaded": True},
                       {"what": "b.svg", "width": 10, "height": 10, "loaded": False},
                       {"what": "c.svg", "width": 10, "height": 10, "loaded": True}],
            "tables": [{"header": "h", "right": 900.0, "scrolls": False, "table_width": 900},
                       {"header": "ok", "right": 790.0, "scrolls": True, "table_width": 2000}]}
    found = book_check.problems(["file:///a.css", "data:x", "https://x.org/a.js"], ["oops"], seen, strict=False)
    assert len(found) == 6
    assert any("https://x.org/a.js" in p for p in found) and any("oops" in p for p in found)
    assert any("zero size" in p and "a.svg" in p for p in found)
    assert any("did not load" in p and "b.svg" in p for p in found)
    assert any("{glue:text}" in p for p in found)
    assert any("wider than the page column" in p and "h" in p for p in found)
    assert book_check.problems(["file:///x.html"], [], {"text": "plain", "charts": [], "tables": []}) == []


def test_strict_rules_on_recorded_pages():
    """Issue 23's rules: a chart is a numbered figure with alt text that is not a file name,
    and a table's content fits its container."""
    seen = {"text": "", "column_right": 800.0,
            "charts": [{"what": "a", "width": 10, "height": 10, "loaded": True, "alt": "_images/a.svg", "caption": ""},
                       {"what": "b", "width": 10, "height": 10, "loaded": True,
                        "alt": "A line chart of time against tokens", "caption": "Figure 2. Time."}],
            "tables": [{"header": "wide", "right": 790.0, "scrolls": True, "table_width": 2000, "container_width": 700},
                       {"header": "fits", "right": 790.0, "scrolls": True, "table_width": 690, "container_width": 700}]}
    found = book_check.strict_problems(seen)
    assert len(found) == 3, found
    assert any("alt text" in p and "_images/a.svg" in p for p in found)
    assert any("numbered caption" in p for p in found)
    assert any("overflows its container" in p and "wide" in p for p in found)
    assert len(book_check.problems([], [], seen)) == 3
    assert book_check.problems([], [], seen, strict=False) == []


def test_every_page_is_held_to_the_strict_rules():
    assert book_check.NOT_YET_STRICT == frozenset()


def test_pages_not_yet_strict_only_warn(monkeypatch):
    seen = {"text": "", "charts": [{"what": "a", "width": 10, "height": 10, "loaded": True, "alt": "", "caption": ""}],
            "tables": []}
    page = "generated/a_page_moving_to_the_new_rules.html"
    monkeypatch.setattr(book_check, "NOT_YET_STRICT", frozenset({page}))
    report = book_check.PageReport(page=page, seen=seen)
    assert report.problems == [] and len(report.warnings) == 2
    assert len(book_check.PageReport(page="generated/answers.html", seen=seen).problems) == 2


def test_pages_leave_out_assets(tmp_path):
    for name in ("index.html", "generated/a.html", "_static/x.html", "_sources/y.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert book_check.pages(tmp_path) == ["generated/a.html", "index.html"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    browser = book_check.find_browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    html = tmp_path_factory.mktemp("html")
    (html / "chart.svg").write_text(SVG)
    for name, text in PAGES.items():
        (html / name).write_text(text)
    screens = html.parent / "screens"
    found = asyncio.run(book_check.check_book(html, screens, browser))
    return {report.page: report for report in found}, screens


@pytest.mark.slow
def test_a_clean_page_passes_and_is_photographed(reports):
    found, screens = reports
    assert found["good.html"].problems == []
    assert (screens / "good.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("page, expected", [
    ("network.html", "request leaves the file system: https://cdn.example.invalid/lib.js"),
    ("console.html", "console error: broken on purpose"),
    ("zero.html", "chart drawn at zero size"),
    ("missing-image.html", "image did not load"),
    ("glue.html", "unfilled glue reference"),
    ("wide.html", "table wider than the page column"),
    ("uncaptioned.html", "chart without alt text"),
    ("uncaptioned.html", "chart without a numbered caption"),
    ("scrolls.html", "table content overflows its container"),
])
def test_each_rule_fails_its_page(reports, page, expected):
    found, _ = reports
    assert any(expected in problem for problem in found[page].problems), found[page].problems
