"""The CUDA extension mixops._C: optional, and when built, its diagnostic ops work and its
reductions split by the Triton kernels' rule.

CI builds the extension (CUDA build of torch + nvcc, one architecture) and sets
MIXOPS_EXPECT_CUDA_EXTENSION=1, so a build that was silently skipped fails here.
"""
import itertools
import os

import pytest
import torch

import mixops
from mixops_testing import setup_py

built = mixops.cuda_extension_available()
needs_extension = pytest.mark.skipif(not built, reason=f"extension not built: {mixops.cuda_extension_status()}")


def test_status_is_consistent():
    status = mixops.cuda_extension_status()
    assert (status == "loaded") == built
    if not built:
        assert "mixops._C" in status


@pytest.mark.skipif(os.environ.get("MIXOPS_EXPECT_CUDA_EXTENSION") != "1", reason="extension not expected here")
def test_extension_was_built_when_expected():
    assert built, mixops.cuda_extension_status()


@needs_extension
def test_cuda_version_matches_torch():
    version = torch.ops.mixops._cuda_version()
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    # CUDART_VERSION is 1000*major + 10*minor; torch and the toolkit share the major version
    assert version // 1000 == major, (version, torch.version.cuda)
    assert version > 0 and minor >= 0


@needs_extension
def test_arch_list_names_compiled_architectures():
    archs = torch.ops.mixops._cuda_arch_list()
    values = [int(a) for a in archs.split(",")]
    assert values and all(a >= 700 for a in values), archs


@needs_extension
def test_device_arch_has_no_cpu_kernel():
    with pytest.raises(NotImplementedError):
        torch.ops.mixops._device_arch(torch.zeros(1))


@pytest.mark.needs_cuda
@needs_extension
def test_device_arch_runs_a_kernel_for_this_gpu():
    got = int(torch.ops.mixops._device_arch(torch.zeros(1, device="cuda"))[0])
    major, minor = torch.cuda.get_device_capability()
    compiled = [int(a) for a in torch.ops.mixops._cuda_arch_list().split(",")]
    assert got in compiled and got <= 100 * major + 10 * minor, (got, compiled)


@needs_extension
def test_reductions_split_by_the_triton_rule(monkeypatch):
    """The CUDA kernels' split of a reduction (csrc/common.cuh deterministic_split: MorphFC and
    ATM weight / bias gradients) is kernels/_common.py's, a function of the shapes alone: the
    op takes no tensor and no device, so no GPU property can enter it."""
    from mixops.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)  # the GPU rule, not the interpreter's
    for length, step, tiles in itertools.product(
        [0, 1, 31, 32, 33, 255, 4096, 401408, 10**9], [16, 32, 128], [1, 2, 3, 7, 81, 256, 257, 10**4]
    ):
        want = _common.deterministic_split(length, step, tiles)
        assert torch.ops.mixops._deterministic_split(length, step, tiles) == want, (length, step, tiles)


@pytest.mark.parametrize(
    "archs, ok",
    [("9.0a", True), ("8.0;9.0a", True), ("8.0+PTX;9.0a", True), ("8.6 8.9", True), ("10.0a", True),
     ("9.0", False), ("8.0;9.0+PTX", False), ("7.5;8.0", False), ("Hopper", False)],
)
def test_build_refuses_architectures_the_kernels_cannot_run_on(archs, ok):
    """setup.py: sm_80 or newer (cp.async), Hopper only as 9.0a: a plain sm_90 copy of the wgmma
    tile could only trap, and the dispatcher could not tell it from the real one."""
    check = setup_py().check_arch_list
    if ok:
        assert check(archs) == archs
    else:
        with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
            check(archs)
