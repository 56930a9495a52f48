"""The ``cuda-emulated`` backend: the CUDA kernels on the CPU, for testing: slow.

The real launchers of the cuda backend (``topk_moe.cuda.stages``), bound to the
emulated device: arrays are guarded NumPy buffers (``arrays``) and kernels are
the same ``.cu`` files built by the host C++ compiler (``loader``). So the
launchers' grids, block sizes, shared-memory sizes and argument types are the
ones a GPU gets. cuBLAS has no emulation: the dense baseline's two GEMMs are
NumPy here (its activation kernel is emulated). Results are checked by the
same tolerance rule as on a GPU, but they are CPU results, never GPU ones.
"""

from __future__ import annotations

import numpy as np

from ..device import emulated_device
from ..stages import Stages

name = "cuda-emulated"
float_dtypes = (np.dtype(np.float32), np.dtype(np.float16))
checks_finite_on_device = True

#: ``expert_mlp`` picks its kernel version by the busiest expert's rows and takes
#: ``max_expert_rows``, their bound (``moe_forward`` passes T), for graph capture.
chooses_kernels_by_rows = True

_stages = Stages(emulated_device())
to_compute = _stages.to_compute
to_index = _stages.to_index
all_finite = _stages.all_finite
route = _stages.route
dispatch = _stages.dispatch
permute = _stages.permute
expert_mlp = _stages.expert_mlp
combine = _stages.combine
dense_mlp = _stages.dense_mlp
