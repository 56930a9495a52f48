"""Offline chart rendering: one way for every chapter to show an Altair chart.

Altair's own notebook renderer emits a Vega-Lite spec plus JavaScript that loads
Vega from a CDN, so a built page would need the network to draw anything. Here
the spec is rendered to SVG at execution time with vl-convert, which bundles
Vega and Vega-Lite and is told to fetch nothing. The executed notebook then holds
a plain ``image/svg+xml`` output. The built book shows it as an image file of its
own and loads no script for it.
"""

from __future__ import annotations

import altair as alt
import vl_convert
from IPython.display import SVG

# vl-convert names Vega-Lite versions "v6_4"; Altair's schema is "v6.4.1".
VEGA_LITE_VERSION = "_".join(alt.SCHEMA_VERSION.split(".")[:2])


def to_svg(chart: alt.TopLevelMixin) -> str:
    """Render ``chart`` to an SVG document, offline.

    ``allowed_base_urls=[]`` makes vl-convert refuse any URL in the spec, so a
    chart whose data is not inline fails here, at execution time, instead of
    silently reaching for the network.
    """
    return vl_convert.vegalite_to_svg(
        chart.to_json(),
        vl_version=VEGA_LITE_VERSION,
        allowed_base_urls=[],
    )


def show(chart: alt.TopLevelMixin) -> SVG:
    """Return ``chart`` as an IPython SVG display object (the last line of a cell)."""
    return SVG(data=to_svg(chart))


#: The Okabe-Ito palette: eight colours that stay apart for the common kinds of colour blindness.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def palette(domain) -> alt.Scale:
    """A colour scale giving each value of ``domain``, in order, the next Okabe-Ito colour
    (charts with more than eight series repeat them; none in this book has that many)."""
    domain = list(domain)
    return alt.Scale(domain=domain, range=[OKABE_ITO[i % len(OKABE_ITO)] for i in range(len(domain))])


# ---------------------------------------------------------------- numbered figures with captions

import base64  # noqa: E402
import html  # noqa: E402
import itertools  # noqa: E402

#: Each executed notebook runs in its own kernel, so this numbers a chapter's figures 1, 2, ...
_figure_numbers = itertools.count(1)


def reset_figure_numbers() -> None:
    """Start numbering figures at 1 again (for a second chapter run in the same process)."""
    global _figure_numbers
    _figure_numbers = itertools.count(1)


class Figure:
    """A chart as the page shows it: the SVG image with alt text, under it "Figure n." and
    its caption. In HTML it is one ``<figure>``; the image is inline (a data: URL), so the
    page still loads nothing from the network."""

    def __init__(self, svg: str, number: int, caption: str, alt: str):
        self.svg, self.number, self.caption, self.alt = svg, number, caption, alt

    def _repr_mimebundle_(self, include=None, exclude=None):
        source = "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode("utf-8")).decode("ascii")
        markup = (f'<figure class="moe-figure" id="figure-{self.number}" style="margin:1em 0">'
                  f'<img src="{source}" alt="{html.escape(self.alt, quote=True)}" style="max-width:100%;height:auto">'
                  f'<figcaption style="font-size:0.9em"><strong>Figure {self.number}.</strong> '
                  f'{html.escape(self.caption)}</figcaption></figure>')
        return {"text/html": markup, "text/plain": f"Figure {self.number}. {self.caption}"}


def figure(chart: alt.TopLevelMixin, caption: str, alt_text: str) -> Figure:
    """Show ``chart`` as the chapter's next numbered figure: ``caption`` says what to read
    from it (one or two sentences), ``alt_text`` what it shows, for a reader who cannot see it.
    Both are required: a figure without them is what issue 23 asked to remove."""
    for name, value in (("caption", caption), ("alt_text", alt_text)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}: expected a non-empty sentence, got {value!r}")
    return Figure(to_svg(chart), next(_figure_numbers), caption.strip(), alt_text.strip())
