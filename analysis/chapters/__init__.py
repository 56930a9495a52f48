"""One module per chapter of the book, named like its notebook in book/notebooks/
(``performance`` holds the sweep views the GPU and CPU chapters share). A chapter
turns records and live runs into tables, charts and glued numbers; it may use
``analysis.measure``, ``analysis.study``, the shared infrastructure and ``kernels``.
"""
