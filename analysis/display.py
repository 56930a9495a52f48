"""How a chapter shows things on the page: notes and tables.

Every chapter shows its text notes and its tables through this module, so the
book has one look: a note is an admonition box; a table has no index column,
3-4 significant digits, units in its headers (which wrap at spaces), and scrolls
sideways inside the page column instead of being cut off when it is wide (though
the book check fails a chapter held to issue 23's rules whose table needs it:
such a table should lose columns, with ``drop_constant``, or split).
"""

from __future__ import annotations

import html
import math
import numbers
from typing import Sequence


class Note:
    """A visible note in the executed notebook and the built page (an admonition
    in HTML, plain text elsewhere)."""

    def __init__(self, title: str, text: str):
        self.title = title
        self.text = text

    def _repr_mimebundle_(self, include=None, exclude=None):
        markup = (f'<div class="admonition note"><p class="admonition-title">{html.escape(self.title)}</p>'
                  f"<p>{html.escape(self.text)}</p></div>")
        return {"text/html": markup, "text/plain": f"{self.title}: {self.text}"}

    def __repr__(self) -> str:
        return f"{self.title}: {self.text}"


def significant(value, digits: int = 3) -> str:
    """``value`` as text with ``digits`` significant digits (integers whole,
    thousands separated; None and NaN as an en dash)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if value == 0 or not math.isfinite(value):
        return str(float(value))
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits + 3 or magnitude < -4:
        return f"{value:.{digits - 1}e}"
    decimals = max(digits - 1 - magnitude, 0)
    text = f"{value:,.{decimals}f}"
    return text


#: Cells of a column whose texts are all at most this long are kept on one line.
SHORT_TEXT = 24


class Table:
    """A pandas DataFrame shown as a formatted HTML table (no index column,
    ``digits`` significant digits, sideways scrolling when wide)."""

    def __init__(self, frame, digits: int = 3, caption: str | None = None, empty: str = "Nothing to list.",
                 drop_constant: bool = False, unbroken: Sequence[str] = ()):
        # A named index (set_index(["preset", "T"])) is data: show it as columns. An
        # unnamed one (0, 1, 2, ...) is not, and is never shown.
        if any(name is not None for name in frame.index.names):
            frame = frame.reset_index()
        missing = [column for column in unbroken if column not in frame.columns]
        if missing:
            raise ValueError(f"unbroken: expected columns of the table, got {missing} (columns: {list(frame.columns)})")
        if drop_constant and len(frame) > 1:
            frame, constants = _split_constant_columns(frame, digits)
            if constants:
                same = "; ".join(f"{name}: {value}" for name, value in constants)
                caption = f"{caption + ' ' if caption else ''}The same in every row: {same}."
        self.unbroken = set(unbroken)
        self.frame = frame
        self.digits = digits
        self.caption = caption
        #: What the page says instead of a table with no rows.
        self.empty = empty

    def _cells(self):
        header = [html.escape(str(column)) for column in self.frame.columns]
        rows = [[html.escape(significant(value, self.digits)) for value in row]
                for row in self.frame.itertuples(index=False, name=None)]
        return header, rows

    def _html_cell(self, column, text: str) -> str:
        """A cell's HTML: in an ``unbroken`` column each space-separated word stays whole
        (a compiler flag such as -Xptxas is never broken at its hyphen); lines break at spaces."""
        if column not in self.unbroken:
            return text
        return " ".join(f'<span style="white-space:nowrap">{word}</span>' for word in text.split(" "))

    def _repr_html_(self) -> str:
        if self.frame.empty:
            return f"<p><em>{html.escape(self.empty)}</em></p>"
        header, rows = self._cells()
        numeric = [self.frame[column].dtype.kind in "iuf" for column in self.frame.columns]
        # Numbers and short texts (names, dates, paths) stay on one line; long texts wrap.
        short = [max((len(row[i]) for row in rows), default=0) <= SHORT_TEXT for i in range(len(header))]
        align = [f'style="text-align:{"right" if is_number else "left"}'
                 f'{";white-space:nowrap" if is_number or is_short else ""}"'
                 for is_number, is_short in zip(numeric, short)]
        # Headers are words with units: they wrap at spaces, so a long header costs height, not width.
        head = "".join(f'<th style="text-align:{"right" if is_number else "left"};white-space:normal">{h}</th>'
                       for is_number, h in zip(numeric, header))
        columns = list(self.frame.columns)
        body = "".join("<tr>" + "".join(f"<td {a}>{self._html_cell(column, c)}</td>"
                                        for a, c, column in zip(align, row, columns)) + "</tr>" for row in rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'<div class="moe-table" style="overflow-x:auto;max-width:100%">'
                f'<table class="table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')

    def __repr__(self) -> str:
        if self.frame.empty:
            return self.empty
        header, rows = self._cells()
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)


def _split_constant_columns(frame, digits: int) -> tuple:
    """(frame without its constant and empty columns, [(name, shown value)] of the constant ones)."""
    constants, keep = [], []
    for column in frame.columns:
        shown = {significant(value, digits) for value in frame[column]}
        if shown <= {"", "\u2013"}:
            continue  # empty: every cell blank or missing
        if len(shown) == 1:
            constants.append((str(column), shown.pop()))
        else:
            keep.append(column)
    return frame[keep], constants


def table(frame, digits: int = 3, caption: str | None = None, empty: str = "Nothing to list.",
          drop_constant: bool = False, unbroken: Sequence[str] = ()) -> Table:
    """Show ``frame`` in a chapter: ``display.table(df)`` as a cell's last line. A frame
    without rows shows the sentence ``empty`` instead of an empty table.

    ``drop_constant``: leave out columns that are empty or hold one value in every row;
    the constant ones are named with their value in the caption instead.
    ``unbroken``: columns whose words must not break inside (flags such as ``-O3``,
    paths): their lines break only at spaces."""
    return Table(frame, digits=digits, caption=caption, empty=empty, drop_constant=drop_constant, unbroken=unbroken)
