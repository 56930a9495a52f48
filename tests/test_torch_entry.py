"""topk_moe.torch: the contract on torch tensors, without copies on the CPU."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="topk_moe.torch needs torch (pip install -e '.[torch]')")

import topk_moe  # noqa: E402
import topk_moe.torch as moe_torch  # noqa: E402


def test_importing_topk_moe_imports_neither_torch_nor_cupy():
    code = "import sys, topk_moe; print('torch' in sys.modules, 'cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_module_imports_the_real_torch():
    assert moe_torch.torch is torch
    assert hasattr(moe_torch.torch, "from_numpy")


def test_as_array_is_a_view_of_a_cpu_tensor():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    array = moe_torch.as_array(tensor)
    assert isinstance(array, np.ndarray)
    assert array.ctypes.data == tensor.data_ptr()
    tensor[1, 2] = -5.0  # a write through the tensor is seen by the array
    assert array[1, 2] == -5.0


def test_as_tensor_is_a_view_of_a_numpy_array():
    array = np.linspace(0, 1, 10, dtype=np.float32).reshape(2, 5)
    tensor = moe_torch.as_tensor(array, "cpu")
    assert tensor.data_ptr() == array.ctypes.data
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_as_tensor_refuses_a_device_it_would_have_to_copy_to():
    with pytest.raises(ValueError, match="device: expected the array to live on cuda:0"):
        moe_torch.as_tensor(np.zeros(3, dtype=np.float32), "cuda:0")
    with pytest.raises(TypeError, match="array: expected a NumPy or CuPy array, got list"):
        moe_torch.as_tensor([1.0, 2.0])


def test_as_array_refuses_a_tensor_that_requires_grad_under_grad_mode():
    tensor = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="x: expected a tensor that does not require grad"):
        moe_torch.as_array(tensor, "x")
    with torch.no_grad():
        assert moe_torch.as_array(tensor, "x").ctypes.data == tensor.data_ptr()


def test_as_array_refuses_bfloat16_and_non_tensors():
    with pytest.raises(TypeError, match="torch.bfloat16"):
        moe_torch.as_array(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="expected a torch.Tensor, got ndarray"):
        moe_torch.as_array(np.ones(2))


# ---------------------------------------------------------------------------
# The contract's functions on tensors


def _layer(T=9, D=16, F=24, E=4, K=2, seed=3):
    cfg = topk_moe.MoEConfig(D, F, E, K)
    weights = moe_torch.init_weights(cfg, seed=seed)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32))
    return x, weights, cfg


def _numpy_weights(weights):
    return topk_moe.MoEWeights(*(None if t is None else t.numpy() for t in
                                 (weights.router, weights.w1, weights.w2, weights.w3)))


def test_init_weights_are_the_numpy_weights_as_tensors():
    cfg = topk_moe.MoEConfig(8, 12, 3, 1)
    tensors = moe_torch.init_weights(cfg, seed=5, dtype=torch.float64)
    arrays = topk_moe.init_weights(cfg, seed=5, dtype=np.float64)
    for name in ("router", "w1", "w2", "w3"):
        np.testing.assert_array_equal(getattr(tensors, name).numpy(), getattr(arrays, name))
    with pytest.raises(TypeError, match="dtype: expected torch.float16, torch.float32 or torch.float64"):
        moe_torch.init_weights(cfg, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda-emulated"])
def test_each_function_on_tensors_equals_the_numpy_call(backend):
    """Same numbers, to the bit, as topk_moe on the NumPy views; every result a tensor."""
    if backend == "cuda-emulated":
        from topk_moe.backends import emulator_unavailable_reason

        if emulator_unavailable_reason() is not None:
            pytest.skip(f"cuda-emulated: {emulator_unavailable_reason()}")
    x, weights, cfg = _layer()
    arrays = _numpy_weights(weights)

    routing = moe_torch.route(x, weights.router, 2, backend=backend)
    expected_routing = topk_moe.route(x.numpy(), arrays.router, 2, backend=backend)
    for name in ("experts", "weights", "probs"):
        assert isinstance(getattr(routing, name), torch.Tensor)
        np.testing.assert_array_equal(getattr(routing, name).numpy(), np.asarray(getattr(expected_routing, name)))
    assert routing.experts.dtype == torch.int32

    plan = moe_torch.dispatch(routing.experts, cfg.n_experts, capacity=4, backend=backend)
    expected_plan = topk_moe.dispatch(expected_routing.experts, cfg.n_experts, capacity=4, backend=backend)
    for name in ("counts", "offsets", "token", "row"):
        assert getattr(plan, name).dtype == torch.int64
        np.testing.assert_array_equal(getattr(plan, name).numpy(), np.asarray(getattr(expected_plan, name)))
    assert plan.n_kept == expected_plan.n_kept

    rows = moe_torch.permute(x, plan, backend=backend)
    expected_rows = topk_moe.permute(x.numpy(), expected_plan, backend=backend)
    np.testing.assert_array_equal(rows.numpy(), np.asarray(expected_rows))

    out = moe_torch.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3, backend=backend)
    expected_out = topk_moe.expert_mlp(expected_rows, expected_plan, arrays.w1, arrays.w2, arrays.w3, backend=backend)
    np.testing.assert_array_equal(out.numpy(), np.asarray(expected_out))

    y = moe_torch.combine(out, routing, plan, backend=backend)
    expected_y = topk_moe.combine(expected_out, expected_routing, expected_plan, backend=backend)
    np.testing.assert_array_equal(y.numpy(), np.asarray(expected_y))

    layer = moe_torch.moe_forward(x, weights, cfg, backend=backend)
    expected_layer = topk_moe.moe_forward(x.numpy(), arrays, cfg, backend=backend)
    assert isinstance(layer, topk_moe.MoEOutput) and isinstance(layer.plan.token, torch.Tensor)
    np.testing.assert_array_equal(layer.y.numpy(), np.asarray(expected_layer.y))
    assert layer.y.device == x.device

    dense = moe_torch.dense_mlp(x, weights.w1[0], weights.w2[0], activation="gelu", backend=backend)
    expected_dense = topk_moe.dense_mlp(x.numpy(), arrays.w1[0], arrays.w2[0], activation="gelu", backend=backend)
    np.testing.assert_array_equal(dense.numpy(), np.asarray(expected_dense))


def test_the_cpu_backend_gets_the_tensors_memory_and_its_result_is_the_tensor(monkeypatch):
    """No copy of activations or weights on the way in, none of y on the way out."""
    from topk_moe import cpu

    seen = {}
    original = cpu.moe_forward

    def spy(x, router, w1, w2, w3, *rest):
        seen.update(x=x, router=router, w1=w1, w2=w2, w3=w3)
        result = original(x, router, w1, w2, w3, *rest)
        seen["y"] = result[0]
        return result

    monkeypatch.setattr(cpu, "moe_forward", spy)
    x, weights, cfg = _layer(T=33)
    out = moe_torch.moe_forward(x, weights, cfg, backend="cpu")
    tensors = {"x": x, "router": weights.router, "w1": weights.w1, "w2": weights.w2, "w3": weights.w3}
    for name, tensor in tensors.items():
        assert seen[name].ctypes.data == tensor.data_ptr(), name
        assert np.shares_memory(seen[name], tensor.numpy()), name
    assert out.y.data_ptr() == seen["y"].ctypes.data


def test_a_layer_on_non_contiguous_tensors_equals_the_contiguous_one():
    x, weights, cfg = _layer(T=8)
    wide = torch.zeros(8, 2 * cfg.d_model)
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    np.testing.assert_array_equal(moe_torch.moe_forward(strided, weights, cfg).y.numpy(),
                                  moe_torch.moe_forward(x, weights, cfg).y.numpy())


def test_bad_input_is_named():
    x, weights, cfg = _layer()
    with pytest.raises(ValueError, match="backend: expected a host backend .* for CPU tensors, got 'cuda'"):
        moe_torch.moe_forward(x, weights, cfg, backend="cuda")
    with pytest.raises(TypeError, match="weights: expected a topk_moe.MoEWeights of tensors, got dict"):
        moe_torch.moe_forward(x, {}, cfg)
    with pytest.raises(TypeError, match="weights.w1: expected a torch.Tensor, got ndarray"):
        moe_torch.moe_forward(x, topk_moe.MoEWeights(weights.router, weights.w1.numpy(), weights.w2, weights.w3), cfg)
    with pytest.raises(TypeError, match="experts: expected a torch.Tensor, got NoneType"):
        moe_torch.dispatch(None, 4)
    with pytest.raises(TypeError, match="weights.router: expected a torch.Tensor, got NoneType"):
        moe_torch.moe_forward(x, topk_moe.MoEWeights(None, weights.w1, weights.w2, weights.w3), cfg)
    with pytest.raises(ValueError, match="w1: expected a CPU or CUDA tensor, got one on meta"):
        moe_torch.dense_mlp(x, weights.w1[0].to("meta"), weights.w2[0])
    with pytest.raises(ValueError, match="x: expected D columns"):  # the contract's own checks still run
        moe_torch.moe_forward(x[:, :5], weights, cfg)
    with pytest.raises(TypeError, match=r"router: expected dtype float64 \(the dtype of x\)"):
        moe_torch.moe_forward(x.double(), weights, cfg)


def test_the_environment_backend_is_named_when_it_cannot_take_cpu_tensors(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND", "cuda")
    x, weights, cfg = _layer()
    with pytest.raises(ValueError, match=r"backend \(from \$MOE_BACKEND\): expected a host backend"):
        moe_torch.route(x, weights.router, 2)


def test_requires_grad_is_refused_under_grad_mode_and_fine_under_inference_mode():
    x, weights, cfg = _layer()
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="x: expected a tensor that does not require grad"):
        moe_torch.moe_forward(x, weights, cfg)
    with torch.inference_mode():
        y = moe_torch.moe_forward(x, weights, cfg).y
    assert not y.requires_grad


# ---------------------------------------------------------------------------
# MoELayer


def test_moe_layer_holds_its_weights_as_buffers_and_keeps_the_input_shape():
    x, weights, cfg = _layer(T=12)
    layer = moe_torch.MoELayer(weights, cfg)
    assert {name for name, _ in layer.named_buffers()} == {"router", "w1", "w2", "w3"}
    assert layer.w1.data_ptr() == weights.w1.data_ptr()  # held, not copied
    hidden = x.reshape(3, 4, cfg.d_model)
    with torch.no_grad():
        y = layer(hidden)
    assert y.shape == hidden.shape and y.dtype == hidden.dtype
    np.testing.assert_array_equal(y.reshape(12, -1).numpy(), moe_torch.moe_forward(x, weights, cfg).y.numpy())
    layer64 = moe_torch.MoELayer(weights, cfg, backend="reference")
    with torch.no_grad():
        assert layer64(hidden).dtype == torch.float32  # the reference's float64 comes back in the input's dtype


def test_moe_layer_is_inference_only():
    x, weights, cfg = _layer()
    layer = moe_torch.MoELayer(weights, cfg)
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="MoELayer is inference only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        moe_torch.MoELayer(weights, cfg, backend="gpu")


def test_moe_layer_checks_for_non_finite_input_as_moe_forward_does():
    x, weights, cfg = _layer()
    x[2, 3] = float("nan")
    layer = moe_torch.MoELayer(weights, cfg)
    with torch.no_grad(), pytest.raises(ValueError, match="non-finite"):
        layer(x)
    layer.check_finite = False  # only the cuda backend may skip the check
    with torch.no_grad(), pytest.raises(ValueError, match="check_finite: expected True for backend 'cpu'"):
        layer(x)


def test_moe_layer_checks_its_shared_expert():
    x, weights, cfg = _layer()
    with pytest.raises(TypeError, match="shared_expert: expected None or a topk_moe.torch.SharedExpert, got dict"):
        moe_torch.MoELayer(weights, cfg, shared_expert={})
    dense = moe_torch.init_weights(topk_moe.MoEConfig(cfg.d_model, 40, 1, 1), seed=9)
    shared = moe_torch.SharedExpert(w1=dense.w1[0], w2=dense.w2[0], w3=dense.w3[0], gate=torch.ones(cfg.d_model, 2))
    with pytest.raises(ValueError, match=r"shared_expert.gate: expected shape \(D, 1\) = \(16, 1\), got \(16, 2\)"):
        moe_torch.MoELayer(weights, cfg, shared_expert=shared)
    shared = moe_torch.SharedExpert(w1=dense.w1[0], w2=dense.w2[0], w3=dense.w3[0], gate=torch.zeros(cfg.d_model, 1))
    with torch.no_grad():
        y = moe_torch.MoELayer(weights, cfg, shared_expert=shared)(x)
    # a zero gate weighs the shared expert by sigmoid(0) = 1/2
    expected = moe_torch.moe_forward(x, weights, cfg).y + 0.5 * moe_torch.dense_mlp(
        x, dense.w1[0], dense.w2[0], dense.w3[0], activation="swiglu")
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


# ---------------------------------------------------------------------------
# CUDA: DLPack on the current torch stream (GPU only)


def _cuda_skip_reason():
    from topk_moe.backends import cuda_unavailable_reason

    if not torch.cuda.is_available():
        return f"needs a CUDA build of torch and a GPU (torch {torch.__version__} sees no CUDA device)"
    return cuda_unavailable_reason()


def test_cuda_stream_hands_cupy_torchs_current_stream_on_the_tensors_device(monkeypatch):
    """The plumbing of the CUDA path without a GPU: CuPy (faked here) is put on the
    tensor's device and wraps torch's current stream there, for the whole call."""
    import types

    events = []

    class FakeContext:
        def __init__(self, *key):
            self.key = key

        def __enter__(self):
            events.append(("enter",) + self.key)

        def __exit__(self, *exception):
            events.append(("exit",) + self.key)
            return False

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda index: FakeContext("device", index),
        ExternalStream=lambda pointer, index: FakeContext("stream", pointer, index)))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=1000 + index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)

    with moe_torch.cuda_stream(torch.device("cuda", 3)):
        events.append("call")
    assert events == [("enter", "device", 3), ("enter", "stream", 1003, 3), "call",
                      ("exit", "stream", 1003, 3), ("exit", "device", 3)]
    events.clear()
    with moe_torch.cuda_stream("cuda"):  # no index: torch's current device
        events.append("call")
    assert events[1] == ("enter", "stream", 1001, 1)
    events.clear()
    with moe_torch.cuda_stream("cpu"):
        events.append("call")
    assert events == ["call"]


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_skip_reason() is not None,
                    reason=f"the DLPack path to CuPy needs a GPU: {_cuda_skip_reason()}")
def test_cuda_tensors_go_through_dlpack_without_copies_on_a_side_stream():
    import cupy

    from topk_moe.testing import assert_close_to_reference, expected_moe_forward, moe_term_scale, plain_moe_forward

    x, weights, cfg = _layer(T=257, D=64, F=96, E=8)
    host_arrays = _numpy_weights(weights)
    x = x.cuda()
    weights = topk_moe.MoEWeights(*(t.cuda() for t in (weights.router, weights.w1, weights.w2, weights.w3)))
    array = moe_torch.as_array(x)
    assert isinstance(array, cupy.ndarray) and array.data.ptr == x.data_ptr()
    back = moe_torch.as_tensor(array, x.device)
    assert back.data_ptr() == x.data_ptr() and back.device == x.device

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x_on_side = x * 1.0  # written on the side stream: the layer must be ordered after it
        out = moe_torch.moe_forward(x_on_side, weights, cfg)
    torch.cuda.synchronize()
    assert out.y.device == x.device and out.routing.experts.device == x.device

    host_x = x.cpu().numpy()
    routing = topk_moe.Routing(*(t.cpu().numpy() for t in (out.routing.experts, out.routing.weights,
                                                          out.routing.probs)))
    assert_close_to_reference(out.y.cpu().numpy(), expected_moe_forward(host_x, host_arrays, cfg, routing),
                              plain_moe_forward(host_x, host_arrays, cfg, routing),
                              scale=moe_term_scale(host_x, host_arrays, cfg, routing.experts))


# ---------------------------------------------------------------------------
# The overhead measurement (analysis.measure.torch_overhead), at tiny sizes


def test_the_overhead_measurement_writes_its_records(tmp_path):
    from analysis import records
    from analysis.measure import torch_overhead

    lines = []
    written = torch_overhead.run("tiny", tokens=(1, 5), top_k=1, rounds=2, repeats=2, results_dir=tmp_path,
                                 echo=lines.append)
    found = records.read_records(torch_overhead.RECORD_KIND, results_dir=tmp_path)
    assert len(found) == len(written) == 2 * len(torch_overhead.ENTRIES)
    assert {(r["params"]["tokens"], r["entry"]) for r in found} == {(T, e) for T in (1, 5)
                                                                   for e in torch_overhead.ENTRIES}
    for record in found:
        assert record["kind"] == "torch-overhead" and record["rounds"] == 2
        assert record["numpy_median_s"] > 0 and record["torch_median_s"] > 0
        assert record["overhead_p20_s"] <= record["overhead_median_s"] <= record["overhead_p80_s"]
        assert record["overhead_median_s"] == pytest.approx(record["overhead_fraction"] * record["numpy_median_s"])
        assert record["params"]["machine"].startswith(("shared", "idle"))
    assert lines[-1].startswith("wrote 4 records to ")
    pytest.importorskip("pandas", reason="overhead_frame makes a pandas table (the book extra)")
    frame = torch_overhead.overhead_frame(found)
    assert list(frame["T"]) == [1, 1, 5, 5] and list(frame["entry"]) == ["moe-layer", "torch-function"] * 2
    record = next(r for r in found if r["params"]["tokens"] == 5 and r["entry"] == "moe-layer")
    assert frame.loc[2, "overhead, median (us)"] == pytest.approx(record["overhead_median_s"] * 1e6)


def test_the_committed_overhead_records_cover_both_token_counts():
    """results/cpu-amd-epyc/torch-overhead.jsonl: what book/contract.md points to."""
    from analysis import records
    from analysis.measure import torch_overhead

    found = records.read_records(torch_overhead.RECORD_KIND, device="cpu-amd-epyc")
    assert {(r["params"]["tokens"], r["entry"]) for r in found} >= {(T, e) for T in (1, 4096)
                                                                  for e in torch_overhead.ENTRIES}
    assert all(r["params"]["machine"] for r in found)


def test_the_overhead_of_a_round_is_the_torch_median_minus_the_numpy_median():
    from analysis.measure import torch_overhead
    from analysis.measure.timing import Timing

    def rounds(medians, fast):
        return [Timing(median_s=m, p20_s=f, p80_s=m + 1, repeats=5) for m, f in zip(medians, fast)]

    timings = {"numpy": rounds([10.0, 20.0, 30.0], [9.0, 9.0, 9.0]),
               "torch-function": rounds([11.0, 23.0, 32.0], [10.0, 10.5, 11.0]),
               "moe-layer": rounds([15.0, 25.0, 35.0], [12.0, 12.0, 12.0])}
    function, layer = torch_overhead.to_records(timings, {"tokens": 1})
    assert function["entry"] == "torch-function" and function["overhead_median_s"] == 2.0
    assert function["numpy_median_s"] == 20.0 and function["torch_median_s"] == 23.0
    assert function["overhead_fraction"] == 0.1 and function["overhead_fast_calls_s"] == 1.5
    assert layer["overhead_median_s"] == 5.0 and layer["overhead_fast_calls_s"] == 3.0
    assert layer["params"] == {"tokens": 1, "entry": "moe-layer"}


def test_the_readme_examples_run(monkeypatch):
    """README's "Using the kernels": the NumPy block, then the torch block that continues it."""
    from pathlib import Path

    monkeypatch.delenv("MOE_BACKEND", raising=False)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using the kernels", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 2 and "topk_moe.torch" in blocks[1]
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md (Using the kernels)", "exec"), namespace)
    np.testing.assert_array_equal(namespace["y"].numpy(), namespace["out"].y)
