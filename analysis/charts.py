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
