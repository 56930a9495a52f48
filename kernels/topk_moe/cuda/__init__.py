"""The CUDA backend: CuPy launching the raw CUDA kernels in this folder.

The backend module itself is ``topk_moe.cuda.backend`` (it imports CuPy at its
top, and ``topk_moe.backends`` imports it only when ``backend="cuda"`` is asked
for). This package file imports nothing, so that the parts that need no GPU,
``build_report`` (nvcc's resource report, the source hash) and
``launch_config`` (the kernels' compile-time constants), import without CuPy.

Files: ``router.cu`` (logits, softmax, top-k), ``dispatch.cu`` (the plan),
``combine.cu`` (permute and combine), ``activation.cu`` (the dense MLP's
activation), ``expert_mlp.cu`` (the grouped expert GEMMs), ``common.cuh``
(float16 conversions shared by the others); ``loader.py`` compiles them.
``stages.py`` holds the launchers, written once over the two seams of
``device.py`` (the array module and the kernel loader), so that the same
launchers run on a GPU (``backend.py``) and on the CPU emulator of
``emulator/`` (backend ``cuda-emulated``: the CUDA kernels on the CPU, for
testing: slow).
"""
