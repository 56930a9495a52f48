"""The CUDA backend: the contract on CuPy arrays, computed by the raw CUDA
kernels of this folder (router.cu, dispatch.cu, combine.cu, activation.cu,
expert_mlp.cu) and, for the dense baseline, cuBLAS.

Same module interface as ``topk_moe.cpu``; the public functions in
``topk_moe.api`` check the arguments once and call these. The launchers live in
``stages.py``, written once for the two devices; this module binds them to
CuPy (arrays on the current stream) and NVRTC (``loader``). The emulated twin
is ``topk_moe.cuda.emulator.backend``.

Non-finite input: the router kernel raises a device flag when a logit is not
finite; ``route`` reads the flag back (one synchronisation) and raises
ValueError, unless ``check_finite=False``. The public API therefore skips its
own check for this backend (``checks_finite_on_device``). With
``check_finite=False`` and a dropless plan, ``moe_forward`` waits for the
device once, to read the largest expert's row count for the expert-MLP
version (``expert_mlp.choose_version``); under CUDA graph capture it waits
never (the version is then chosen from min(N, T), T being a bound of any
expert's rows), so it can be captured.
"""

from __future__ import annotations

import cupy  # noqa: F401 - the "cuda" backend is CuPy's: fail here, at import, without it
import numpy as np

from .device import cupy_device
from .stages import Stages

name = "cuda"
float_dtypes = (np.dtype(np.float32), np.dtype(np.float16))

#: ``route`` checks x and router for NaN and infinity on the device (and takes
#: ``check_finite``); ``topk_moe.api`` leaves that check to it.
checks_finite_on_device = True

#: ``expert_mlp`` picks its kernel version by the busiest expert's rows and takes
#: ``max_expert_rows``, their bound (``moe_forward`` passes T), for graph capture.
chooses_kernels_by_rows = True

_stages = Stages(cupy_device())
to_compute = _stages.to_compute
to_index = _stages.to_index
all_finite = _stages.all_finite
route = _stages.route
dispatch = _stages.dispatch
permute = _stages.permute
expert_mlp = _stages.expert_mlp
combine = _stages.combine
dense_mlp = _stages.dense_mlp
