"""How chapters show things (analysis/display.py, analysis/charts.py): tables without an
index column, significant digits, wide tables that scroll, notes, one colour-blind-safe palette."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import display


@pytest.mark.parametrize("value, digits, text", [
    (3.14159, 3, "3.14"), (0.000123456, 3, "0.000123"), (1234.5, 3, "1,234"), (12, 3, "12"),
    (123456789.0, 3, "1.23e+08"), (None, 3, "\u2013"), (math.nan, 3, "\u2013"), ("swiglu", 3, "swiglu"),
    (-0.0123, 2, "-0.012"),
])
def test_significant(value, digits, text):
    assert display.significant(value, digits) == text


def test_table_has_no_unnamed_index_and_shows_a_named_one():
    frame = pd.DataFrame({"T": [1, 2], "time (ms)": [0.123456, 12.3456]}, index=[7, 8])
    html = display.table(frame)._repr_html_()
    assert ">7<" not in html and ">0.123<" in html and ">12.3<" in html
    named = display.table(frame.set_index("T"))._repr_html_()
    assert "<th" in named and ">T</th>" in named and ">1<" in named


def test_table_scrolls_and_keeps_short_cells_on_one_line():
    frame = pd.DataFrame({"path": ["cpu-amd-epyc/sweep.jsonl"], "note": ["word " * 30]})
    html = display.table(frame)._repr_html_()
    assert 'overflow-x:auto' in html
    cells = html.split("<td ")[1:]
    assert "nowrap" in cells[0] and "nowrap" not in cells[1]


def test_note_is_an_admonition_with_escaped_text():
    bundle = display.Note("Where", "a < b")._repr_mimebundle_()
    assert 'class="admonition note"' in bundle["text/html"] and "a &lt; b" in bundle["text/html"]
    assert bundle["text/plain"] == "Where: a < b"


def test_palette_is_okabe_ito_in_order():
    charts = pytest.importorskip("analysis.charts", reason="the book extra is not installed")
    scale = charts.palette(["a", "b", "c"]).to_dict()
    assert scale["domain"] == ["a", "b", "c"] and scale["range"] == list(charts.OKABE_ITO[:3])


def test_an_empty_table_is_a_sentence():
    shown = display.table(pd.DataFrame(columns=["what", "problem"]), empty="Nothing failed.")
    assert shown._repr_html_() == "<p><em>Nothing failed.</em></p>" and repr(shown) == "Nothing failed."


def test_constant_and_empty_columns_move_to_the_caption():
    frame = pd.DataFrame({"arm": ["a", "b"], "dtype": ["float32", "float32"], "note": [None, None],
                          "time (ms)": [1.0, 2.0]})
    shown = display.table(frame, drop_constant=True)
    assert list(shown.frame.columns) == ["arm", "time (ms)"]
    assert shown.caption == "The same in every row: dtype: float32."
    assert list(display.table(frame).frame.columns) == list(frame.columns)  # opt-in


def test_unbroken_columns_keep_each_word_whole_and_headers_wrap():
    frame = pd.DataFrame({"flags": ["-O3 -Xptxas -v"], "x": [1]})
    html = display.table(frame, unbroken=["flags"])._repr_html_()
    assert '<span style="white-space:nowrap">-Xptxas</span>' in html
    assert "white-space:normal" in html
    with pytest.raises(ValueError, match="unbroken: expected columns of the table"):
        display.table(frame, unbroken=["nope"])


def test_figure_is_numbered_with_caption_and_alt_text():
    import altair as alt

    from analysis import charts

    charts.reset_figure_numbers()
    chart = alt.Chart(pd.DataFrame({"x": [1, 2], "y": [3, 4]})).mark_line().encode(x="x:Q", y="y:Q")
    first = charts.figure(chart, "What to read from it.", "A rising line.")
    second = charts.figure(chart, "Another.", "Another line.")
    html = second._repr_mimebundle_()["text/html"]
    assert first.number == 1 and second.number == 2
    assert "<strong>Figure 2.</strong> Another." in html and 'alt="Another line."' in html
    assert 'src="data:image/svg+xml;base64,' in html
    with pytest.raises(ValueError, match="alt_text: expected a non-empty sentence"):
        charts.figure(chart, "Caption.", " ")
