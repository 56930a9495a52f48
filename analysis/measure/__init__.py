"""Measuring the kernels: the one timing helper, roofline formulas, the PyTorch peers,
the benchmark sweep (plan, cells, runner), bench-cpu, GPU utilisation and the device check.
Imports the shared infrastructure and ``kernels``; never a chapter.
"""
