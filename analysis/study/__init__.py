"""The accuracy study: the byte corpus, the dense/top-1/top-2 byte transformer, the
training CLI, scoring (bits per byte) and the routing metrics on plain arrays.
Imports the shared infrastructure and ``kernels``; never a chapter.
"""
