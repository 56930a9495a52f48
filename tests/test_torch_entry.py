"""topk_moe.torch: the contract on torch tensors, without copies on the CPU."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="topk_moe.torch needs torch (pip install -e '.[torch]')")

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
