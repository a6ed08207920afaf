"""The Triton kernels of ``window_attention`` (kernels/window_attention.py) beyond the op tests
every backend runs (tests/test_window_attention_op.py): edge windows along both axes at
UniFormer's window sizes with the configs' head dims, several query and key blocks per window,
outputs written exactly where they belong (NaN canaries), each gradient alone, bit-for-bit
determinism, the sm_90 builds; GPU tests at the official shapes. All against the float64
reference; on CPU tensors under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import mixops
import sm90_compile
from mixops.reference import window_attention as ref
from mixops_testing import assert_close, skip_unless_runs

K = pytest.importorskip("mixops.kernels.window_attention")

OP = "window_attention"
NAN = float("nan")


@pytest.fixture(autouse=True)
def triton_runs(request):
    """The CPU tests need the interpreter, the GPU ones a GPU; the sm_90 builds neither."""
    if request.node.name.startswith("test_kernel_compiles_for_sm90"):
        return
    skip_unless_runs(OP, "triton", "cuda" if request.node.get_closest_marker("needs_cuda") else "cpu")


def _inputs(lead, heads, d, dtype=torch.float64, device="cpu", bias=True):
    qkv = torch.randn(*lead, 3 * heads * d, dtype=dtype, device=device)
    b = torch.randn(3 * heads * d, dtype=dtype, device=device) if bias else None
    return qkv, b


def check(lead, heads, d, ws, padding, dtype=torch.float64, device="cpu", backend="triton"):
    """Forward, dqkv and dbias of a backend against the float64 reference on the same (rounded)
    inputs (tests/test_window_attention_cuda.py runs it on the cuda backend)."""
    qkv, b = _inputs(lead, heads, d, dtype, device)
    leaves = [qkv.requires_grad_(), b.requires_grad_()]
    kw = dict(num_heads=heads, window_size=ws, padding=padding)
    out = mixops.window_attention(qkv, qkv_bias=b, backend=backend, **kw)
    g = torch.randn(out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, leaves, g)
    exact = [t.detach().cpu().double().requires_grad_() for t in leaves]
    want = ref.window_attention(exact[0], heads, ws, d**-0.5, padding, exact[1])
    assert_close(out, want, dtype=dtype, name="output")
    # mask padding never reads the bias: its gradient is zero
    expected = torch.autograd.grad(want, exact, g.cpu().double(), allow_unused=True)
    for name, a, e, t in zip(("qkv", "qkv_bias"), got, expected, exact):
        assert_close(a, torch.zeros_like(t) if e is None else e, dtype=dtype, name=f"grad {name}")


# (lead dims, heads, d, ws, padding): edge windows on both axes at ws 14 and 7 with d = 32 and 64
# (several 128-token blocks per 196-token window), ws larger than the map, an odd global map
EDGE_CASES = [
    pytest.param((1, 18, 30), 2, 32, 14, "bias", id="ws14-edges-d32"),
    pytest.param((2, 9, 11), 1, 64, 7, "bias", id="ws7-odd-d64"),
    pytest.param((1, 18, 30), 2, 32, 14, "mask", id="ws14-edges-mask"),
    pytest.param((1, 5, 9), 2, 32, 14, "bias", id="ws-gt-map"),
    pytest.param((1, 13, 11), 2, 32, None, "bias", id="global-odd"),
    pytest.param((1, 3, 7, 9), 1, 32, None, "bias", id="video-global"),
]


@pytest.mark.parametrize("lead, heads, d, ws, padding", EDGE_CASES)
def test_edge_windows_forward_and_backward(lead, heads, d, ws, padding):
    check(lead, heads, d, ws, padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_storage_dtypes(dtype):
    check((1, 9, 11), 2, 16, 7, "bias", dtype)


def _canary(shape):
    """A strided view of ``shape`` inside a NaN buffer, and the mask of the view."""
    buf = torch.full((shape[0] + 1, *(n + 2 for n in shape[1:-1]), shape[-1] + 5), NAN, dtype=torch.float64)
    inside = torch.zeros(buf.shape, dtype=torch.bool)
    index = (slice(1, None), *(slice(1, n + 1) for n in shape[1:-1]), slice(2, shape[-1] + 2))
    inside[index] = True
    return buf, buf[index], inside


@pytest.mark.parametrize("ws", [3, None])
def test_outputs_written_exactly(ws):
    """out and dqkv into strided views of NaN buffers: nothing outside is written, every
    element inside is (no NaN left), the values are right."""
    heads, d = 2, 8
    qkv, b = _inputs((2, 7, 5), heads, d)
    g = K.geometry(qkv, heads, ws)
    buf, out, inside = _canary((2, 7, 5, heads * d))
    K.launch_forward(qkv.unsqueeze(1), b, out.unsqueeze(1), g, d**-0.5, ws is not None)
    assert buf[~inside].isnan().all(), "forward wrote outside out"
    assert_close(out, ref.window_attention(qkv, heads, ws, d**-0.5, "bias", b), name="out")

    dout = torch.randn(2, 7, 5, heads * d, dtype=torch.float64)
    (dqkv, db) = K.backward([dout], [True, True], qkv, heads, ws, d**-0.5, "bias", b)
    exact = [qkv.clone().requires_grad_(), b.clone().requires_grad_()]
    want = torch.autograd.grad(ref.window_attention(exact[0], heads, ws, d**-0.5, "bias", exact[1]), exact, dout,
                               allow_unused=True)  # global attention has no padding: no bias gradient
    assert not dqkv.isnan().any()
    assert_close(dqkv, want[0], name="dqkv")
    assert_close(db, torch.zeros_like(b) if want[1] is None else want[1], name="dbias")


def test_each_gradient_alone_is_the_same():
    heads, d = 2, 8
    qkv, b = _inputs((2, 7, 5), heads, d)
    dout = torch.randn(2, 7, 5, heads * d, dtype=torch.float64)
    both = K.backward([dout], [True, True], qkv, heads, 3, 0.3, "bias", b)
    (alone_qkv,) = K.backward([dout], [True, False], qkv, heads, 3, 0.3, "bias", b)
    (alone_bias,) = K.backward([dout], [False, True], qkv, heads, 3, 0.3, "bias", b)
    assert torch.equal(alone_qkv, both[0]) and torch.equal(alone_bias, both[1])


def test_bf16_bit_for_bit_deterministic():
    qkv, b = _inputs((2, 9, 11), 2, 16, torch.bfloat16)
    leaves = [qkv.requires_grad_(), b.requires_grad_()]
    dout = torch.randn(2, 9, 11, 32, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = mixops.window_attention(qkv, num_heads=2, window_size=7, qkv_bias=b, backend="triton")
        runs.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, a, c in zip(("out", "dqkv", "dbias"), *runs):
        assert torch.equal(a, c), name


def test_tiles():
    for lead, ws in (((2, 56, 56), 7), ((1, 50, 84), 14), ((1, 32, 32), 32), ((1, 8, 14, 14), None)):
        for d in (2, 32, 64):
            t = K.attention_tiles(K.geometry(torch.empty(*lead, 3 * d), 1, ws), torch.bfloat16)
            assert t.dp >= max(d, 16) and t.dp & (t.dp - 1) == 0
            assert min(t.bq, t.bk) >= 16


# --- GPU ------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, heads, d, ws, padding",
    [
        pytest.param((2, 50, 84), 5, 64, 14, "bias", id="det-ws14"),
        pytest.param((2, 32, 32), 5, 64, 14, "bias", id="ade-ws14"),
        pytest.param((2, 32, 32), 5, 64, 32, "bias", id="ade-ws32"),
        pytest.param((2, 50, 84), 5, 64, 14, "mask", id="det-ws14-mask"),
        pytest.param((2, 14, 14), 5, 64, None, "bias", id="global"),
        pytest.param((1, 8, 14, 14), 5, 64, None, "bias", id="video16"),
    ],
)
def test_gpu_official_shapes(lead, heads, d, ws, padding, dtype):
    """UniFormer-S stage 3 (C = 320, 5 heads of 64) at detection and ADE20K sizes, global and the
    16-frame video stage."""
    check(lead, heads, d, ws, padding, dtype, "cuda")


# --- sm_90 builds -----------------------------------------------------------------------------

KERNELS = ("forward", "key_grad", "query_grad", "virtual_key_grad")
_BUILDS = {f"{k}-{dt}": (k, dt) for k in KERNELS for dt in ("bfloat16", "float32", "tf32")}


def _build(kernel: str, dtype_name: str) -> dict:
    """Record the launch of ``kernel`` at UniFormer-S stage 3, detection size (B = 8, 50 x 84,
    ws 14, 5 heads of 64), and compile it for sm_90. "tf32": fp32 with torch allowing TF32."""
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
    names = {"forward": "_forward_kernel", "key_grad": "_key_grad_kernel", "query_grad": "_query_grad_kernel",
             "virtual_key_grad": "_virtual_key_grad_kernel"}  # fmt: skip
    calls = []
    originals = {n: getattr(K, n) for n in names.values()}
    for n, fn in originals.items():
        setattr(K, n, sm90_compile.Recorder(fn, calls))
    sums, K.column_sum = K.column_sum, lambda t: torch.zeros(t.shape[0], t.shape[2], dtype=t.dtype)
    try:
        qkv, b = torch.empty(8, 50, 84, 960, dtype=dtype), torch.empty(960, dtype=dtype)
        K.backward([torch.empty(8, 50, 84, 320, dtype=dtype)], [True, True], qkv, 5, 14, 0.125, "bias", b)
    finally:
        for n, fn in originals.items():
            setattr(K, n, fn)
        K.column_sum = sums
    ((fn, args, kwargs),) = [c for c in calls if c[0] is originals[names[kernel]]]
    return sm90_compile.compile_launch(fn, args, kwargs, cfg={"num_warps": kwargs.get("num_warps", 4)})


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_window_attention_triton", timeout=900)


@pytest.mark.parametrize("build", list(_BUILDS))
def test_kernel_compiles_for_sm90_without_spills(sm90_builds, build):
    sm90_compile.assert_built(sm90_builds[build])
