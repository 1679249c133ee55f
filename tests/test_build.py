"""The extension is built, registers its ops with CPU kernels and fake kernels, and says what it is."""
import subprocess
import sys

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend


def _ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ntkcl_fast::"))


def test_extension_is_built():
    assert _backend._C is not None, f"ntkcl_fast._C failed to import: {_backend._C_ERROR}"
    assert ntkcl_fast.backends()["cpu"]


@pytest.mark.parametrize("key", ["CPU", "Meta"])
def test_every_op_has_a_kernel(key):
    """CPU from csrc/cpu; Meta is where torch.library.register_fake puts the Python fake kernels."""
    ops = _ops()
    assert ops
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernels_built_when_a_gpu_is_present():
    for op in _ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "ntkcl_fast", "info"], capture_output=True, text=True, check=True)
    assert "backend cpu" in out.stdout and "torch" in out.stdout


def test_package_works_without_the_extension():
    """A missing build leaves the reference backend, and says why the others are missing."""
    code = (
        "import sys; sys.modules['ntkcl_fast._C'] = None\n"  # makes `import ntkcl_fast._C` fail
        "import torch, ntkcl_fast\n"
        "from ntkcl_fast import _backend\n"
        "b = ntkcl_fast.backends(); assert b['torch'] and not b['cpu'] and not b['cuda'], b\n"
        "assert 'not importable' in _backend.unavailable_reason('cpu', 'cpu')\n"
        "e, s = torch.zeros(3), torch.ones(3)\n"
        "ntkcl_fast.ema_update_(e, s, 0.5)\n"
        "assert e.tolist() == [0.5] * 3\n"
        "try:\n"
        "    ntkcl_fast.ema_update_(e, s, 0.5, backend='cpu')\n"
        "except RuntimeError as exc:\n"
        "    assert 'pip install' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('backend cpu ran without the extension')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", ["torch._dynamo", "torch.distributed.tensor"])
def test_import_leaves_heavy_torch_modules_unloaded(module):
    """Importing the package and running eager ops imports neither torch._dynamo (~150 MB) nor
    torch.distributed.tensor (~0.6 s): the merge CLI and plain eager users need neither."""
    code = ("import sys, torch, ntkcl_fast; x = torch.randn(10, requires_grad=True); "
            "ntkcl_fast.l2_penalty([x], [x.detach()]).backward(); "
            "ntkcl_fast.ema_update_([x.detach().clone()], [x.detach()], decay=0.9); "
            "ntkcl_fast.dare(x.detach(), torch.zeros(10), 0.5); "
            f"print({module!r} in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_constant_under_compile_marks_as_torch_does():
    """_backend.constant_under_compile stands in for torch.compiler.assume_constant_result; torch
    must still mark functions the same way, or compiled graphs would trace `resolve`."""
    def mine():
        return 0

    def theirs():
        return 0

    _backend.constant_under_compile(mine)
    torch.compiler.assume_constant_result(theirs)
    assert vars(mine) == vars(theirs) == {"_dynamo_marked_constant": True}
