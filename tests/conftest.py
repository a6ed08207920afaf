"""Test configuration: Triton interpreter on GPU-less machines, the needs_cuda marker, seeds.

TRITON_INTERPRET must be set before anything imports the Triton kernels (``mixops.kernels``):
``triton.jit`` decides at decoration time whether a kernel is interpreted. Importing torch
first is safe; it does not import triton.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: a cached graph keeps calling an op with the schema it had
# when it was compiled, so a schema change would otherwise fail against a stale cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mixops-inductor-"))

import pytest  # noqa: E402

# fp32 means fp32 in the tests: PyTorch lets cuDNN convolutions use TF32 by default, which
# would put the fp32 torch backend ~1e-3 away from the float64 reference on a GPU.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: the test needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line(
        "markers", "op(name): the mixops op a test exercises; its `backend` argument then runs "
        "over every backend registered for that op"
    )


def pytest_generate_tests(metafunc):
    """A test that takes ``backend`` runs once per backend registered for its ``op`` mark, so
    a newly registered kernel is tested by every existing op test without editing it. The
    cuda backend is marked needs_cuda; triton runs on CPU tensors under the interpreter."""
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("op")
    if mark is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a `backend` test needs @pytest.mark.op(name)")
    import mixops

    params = [
        pytest.param(b, id=b, marks=[pytest.mark.needs_cuda] if b == "cuda" else [])
        for b in mixops.available_backends(mark.args[0])
    ]
    metafunc.parametrize("backend", params)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # exit code 5 = nothing collected/selected (e.g. `-m needs_cuda` on a CPU machine): not a failure
    if exitstatus == 5:
        session.exitstatus = 0


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state and leaves the global state as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
