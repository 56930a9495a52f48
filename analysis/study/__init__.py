"""The accuracy study: the byte corpus, the dense/top-1/top-2 byte transformer, the
training CLI, scoring (bits per byte; the whole-split rescore CLI), the routing metrics
on plain arrays, paired statistics by seed, the compressor anchor and the
train/test verbatim-overlap (contamination) measure.
Imports the shared infrastructure and ``kernels``; never a chapter.
"""
