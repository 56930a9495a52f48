"""Everything the book's notebooks call, by role.

- ``analysis.measure``: timing, rooflines, peers, the sweep, bench-cpu, GPU utilisation and the device check;
- ``analysis.study``: the accuracy study (corpus, byte transformer, training, scoring, routing metrics);
- ``analysis.chapters``: one module per book chapter, turning records and live runs into tables and charts.
The modules at this top level are the shared infrastructure (records, charts,
display, the notebook runner) and import none of the three packages.
"""
