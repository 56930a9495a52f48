"""A CPU emulator of the CUDA that kernels/topk_moe/cuda/*.cu use, so the real kernels run
(slowly) where there is no GPU: in `make test` and on any laptop.

- ``cuda_emulator.h``: the runtime, force-included into each rewritten file
  (fibers for threads, warp collectives, shared memory, __half, inline PTX).
- ``rewrite.py``: the mechanical, line-preserving source rewrites.
- ``build.py``: the host compiler build, cached outside the repository.
- ``loader.py``: ``get_kernel``, the emulated twin of ``topk_moe.cuda.loader``,
  launching kernels on NumPy arrays through ctypes, with faults as errors.
- ``arrays.py``: the array module of the emulated device (guarded, poisoned
  NumPy buffers), the twin of CuPy for the backend's launchers.
- ``backend.py``: the ``cuda-emulated`` backend.
- ``traffic.h``, ``traffic.py``: memory-traffic counters of a second build
  flavour (``traffic.counting()``): per launch and per source line, warp-wide
  requests, global sectors and shared wavefronts against their minimum, and the
  distinct bytes of each array (analysis.measure.traffic records them).
- ``racecheck.h``, ``racecheck.py``: a data-race detector in the same
  instrumented flavour (``racecheck.checking()`` or ``MOE_EMULATOR_RACECHECK=1``):
  shared- and global-memory hazards that no barrier orders, with both source
  lines, the threads and the address; ``racecheck_cases.py``: small launches of
  every kernel, and ``run_all_kernels()``, which runs them all under racecheck.

This file imports nothing, so ``topk_moe.backends`` can ask about the emulator
cheaply.
"""
