"""kernels/launcher.py on CPU: its cache key against Triton's own specializer (the key may be finer, never coarser),
the arguments it passes against Triton's binder on the package's kernels, and which launches reuse a compiled
kernel (a stand-in for Triton's compile and launcher: no GPU here). The GPU tests (test_kernels.py, -m gpu) run
every kernel through it for real."""

import itertools
import os
import sys

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpaware_compile.kernels import common, launcher, wgmma, wgmma_prefill  # noqa: E402

BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))
KERNELS_JIT = isinstance(wgmma._wgmma_kernel, launcher.JITFunction)  # not under TRITON_INTERPRET=1
needs_jit = pytest.mark.skipif(not KERNELS_JIT, reason="the kernels were decorated under TRITON_INTERPRET=1")


def triton_spec(v, is_const=False):
    return native_specialize_impl(CUDABackend, v, is_const, True, True)


def key_of(*args, **kwargs):
    return launcher.launch_key(None, 0, args, kwargs)


def assert_finer(values, spec):
    """Values that share a launch key share Triton's specialization."""
    groups = {}
    for v in values:
        groups.setdefault(key_of(v), set()).add(spec(v))
    assert all(len(specs) == 1 for specs in groups.values()), groups


def test_tensor_key_is_finer_than_triton():
    buf = {d: torch.zeros(256, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.int32)}
    views = [b[off:] for b in buf.values() for off in range(0, 40)]
    for is_const in (False, True):
        assert_finer(views, lambda v: triton_spec(v, is_const))
    # and it tells apart what Triton tells apart: the dtype and a 16-byte multiple
    assert key_of(buf[torch.float16]) != key_of(buf[torch.float16][1:]) != key_of(buf[torch.bfloat16])


def test_scalar_key_tells_apart_what_python_equates():
    assert len({key_of(v) for v in (1, True, 1.0)}) == 3
    assert len({triton_spec(v) for v in (1, True, 1.0)}) == 3
    ints = list(range(-40, 70)) + [2 ** 31 - 1, 2 ** 31, 2 ** 63]
    assert_finer(ints, triton_spec)
    assert key_of(None) == key_of(None) and key_of(16) != key_of(32)


def test_descriptor_key_is_finer_than_triton():
    descs = []
    for d, m, off, bm in itertools.product((torch.float16, torch.bfloat16), (1, 300), (0, 8, 64), (128, 256)):
        x = torch.zeros(m * 512 + off, dtype=d)[off:].view(m, 512)  # offsets of 16 bytes: TMA's alignment
        layout = wgmma_prefill.x_smem_layout(bm, 128, common.tl_dtype(d))
        descs.append(TensorDescriptor.from_tensor(x, [bm, 128], layout))
    assert_finer(descs, triton_spec)
    assert len({key_of(d) for d in descs}) == 4  # dtype x block: what Triton specializes on


@needs_jit
@pytest.mark.parametrize("kernel", ["wgmma", "reduce"])
def test_bound_tail_matches_triton_binder(kernel):
    """What the launcher passes after the positional arguments is what Triton's binder binds (defaults too)."""
    if kernel == "wgmma":
        fn = wgmma._wgmma_kernel
        t = torch.zeros(64, dtype=torch.int32)
        args = (t.half(), t, t, t.half(), t.float(), t.half(), t, None, 1, 64, 128, 128, 64, 0, 0, 1, 0x6400)
        kwargs = dict(GROUP_SIZE=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, DTYPE=common.tl_dtype(torch.float16),
                      SERIAL=True, SWIGLU=False, EVEN=True, TILED=True, WORDS=wgmma.word_layout(64, 128, 4, True),
                      XL=wgmma.x_layout(16, 128))  # PARTS left to its default
    else:
        fn = common._splitk_reduce_kernel
        args = (torch.zeros(8), torch.zeros(4).half())
        kwargs = dict(BLOCK=1024, MN=4, SPLIT_K=2)  # a runtime argument by keyword too, out of order
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound = tuple(binder(*args, **kwargs)[0].values())
    ours = (*args, *launcher.bound_tail(fn, len(args), kwargs))
    assert len(bound) == len(ours) and all(a is b or a == b for a, b in zip(bound, ours))


class FakeCompiled:
    """Stands for a CompiledKernel: records its launcher's calls."""
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *a):
        self.launches.append(a)


class FakeDriver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)


@pytest.fixture
def fake_triton(monkeypatch):
    """The reduction kernel with Triton's JIT launch replaced: returns (kernel, Triton-path calls, compiled)."""
    kernel = common._splitk_reduce_kernel
    if not isinstance(kernel, launcher.JITFunction):
        pytest.skip("the kernels were decorated under TRITON_INTERPRET=1")
    compiled, jit_calls = FakeCompiled(), []

    def jit_run(*args, grid, warmup, **kwargs):
        jit_calls.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", jit_run, raising=False)
    monkeypatch.setattr(launcher, "driver", FakeDriver)
    monkeypatch.setattr(launcher, "_compiled", {})
    return kernel, jit_calls, compiled


def test_second_launch_of_a_key_skips_triton(fake_triton):
    kernel, jit_calls, compiled = fake_triton
    part, out = torch.zeros(2, 8), torch.zeros(8).half()
    launcher.launch_kernel(kernel, (1,), part, out, 8, SPLIT_K=2, BLOCK=1024, num_warps=4)
    assert len(jit_calls) == 1 and not compiled.launches
    part2, out2 = torch.zeros(2, 8), torch.zeros(8).half()  # new tensors, same dtypes and alignment
    launcher.launch_kernel(kernel, (1,), part2, out2, 8, SPLIT_K=2, BLOCK=1024, num_warps=4)
    assert len(jit_calls) == 1
    assert compiled.launches == [(1, 1, 1, 1234, "function", "metadata", None, None, None, part2, out2, 8, 2, 1024)]


@pytest.mark.parametrize("change", ["int", "alignment", "dtype", "constexpr", "option"])
def test_a_new_specialization_goes_through_triton(fake_triton, change):
    kernel, jit_calls, compiled = fake_triton
    part, out = torch.zeros(2, 16), torch.zeros(16).half()
    launcher.launch_kernel(kernel, (1,), part, out, 16, SPLIT_K=2, BLOCK=1024)
    args, kwargs = [part, out, 16], dict(SPLIT_K=2, BLOCK=1024)
    if change == "int":
        args[2] = 1  # Triton makes 1 a constant
    elif change == "alignment":
        args[1] = torch.zeros(17).half()[1:]
    elif change == "dtype":
        args[1] = torch.zeros(16).bfloat16()
    elif change == "constexpr":
        kwargs["BLOCK"] = 512
    else:
        kwargs["num_warps"] = 8
    launcher.launch_kernel(kernel, (1,), *args, **kwargs)
    assert len(jit_calls) == 2 and not compiled.launches


def test_what_the_key_cannot_hold_always_goes_through_triton(fake_triton, monkeypatch):
    kernel, jit_calls, compiled = fake_triton
    part, out = torch.zeros(2, 8), torch.zeros(8).half()
    for _ in range(2):
        launcher.launch_kernel(kernel, (1,), part, out=out, MN=8, SPLIT_K=2, BLOCK=1024)  # a tensor by keyword
        launcher.launch_kernel(kernel, (1,), part, out, [8], SPLIT_K=2, BLOCK=1024)  # an unhashable list
    assert len(jit_calls) == 4 and not compiled.launches
    monkeypatch.setattr(launcher, "JIT_ONLY", True)
    for _ in range(2):
        launcher.launch_kernel(kernel, (1,), part, out, 8, SPLIT_K=2, BLOCK=1024)
    assert len(jit_calls) == 6 and not compiled.launches


def test_launch_hooks_go_through_triton(fake_triton, monkeypatch):
    kernel, jit_calls, compiled = fake_triton
    part, out = torch.zeros(2, 8), torch.zeros(8).half()
    launcher.launch_kernel(kernel, (1,), part, out, 8, SPLIT_K=2, BLOCK=1024)
    chain = launcher.knobs.runtime.launch_exit_hook  # triton 3.6: an empty chain of hooks, not None
    monkeypatch.setattr(chain, "calls", [lambda *a: None])
    launcher.launch_kernel(kernel, (1,), part, out, 8, SPLIT_K=2, BLOCK=1024)
    monkeypatch.setattr(launcher.knobs.runtime, "launch_enter_hook", lambda *a: None)  # a hook set the older way
    monkeypatch.setattr(chain, "calls", [])
    launcher.launch_kernel(kernel, (1,), part, out, 8, SPLIT_K=2, BLOCK=1024)
    assert len(jit_calls) == 3 and not compiled.launches


def _random_weight(k, n, gs, dtype):
    from tpaware_compile import gptq
    g = k // gs
    qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    qz = torch.randint(-2**31, 2**31 - 1, (g, n // 8), dtype=torch.int32, device="cuda")
    sc = (torch.rand(g, n, device="cuda") * 0.01 + 1e-3).to(dtype)
    return gptq.GPTQWeight(qw, qz, sc, None, gs, 1, 0)


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def triton_path_launches(monkeypatch):
    """A list that grows by one for every launch that goes through Triton's JIT launcher; the launcher's cache
    emptied first."""
    calls, run = [], launcher.JITFunction.run
    monkeypatch.setattr(launcher, "_compiled", {})

    def counted(self, *args, **kwargs):
        calls.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(launcher.JITFunction, "run", counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096), (8192, 3584)])
@pytest.mark.parametrize("tiled", [False, True])
def test_launches_reuse_compiled_kernels_gpu(k, n, tiled, triton_path_launches):
    """Each dispatch path called again through the launcher's cache (no launch through Triton the second time), on
    fresh x, at token counts that move between specializations (1, 16, 300, 1), on a view of x whose address is
    not a multiple of 16 bytes, and replayed from a CUDA graph: every output against the fp32 reference, the
    output poisoned first."""
    from tpaware_compile import gptq
    from tpaware_compile.kernels import gptq_mm_sorted
    from tpaware_compile.layout import tile
    from test_kernels import TOL, _poison
    w = _random_weight(k, n, 128, torch.float16)
    qw = tile(w.qweight) if tiled else w.qweight
    for m, again in ((1, False), (1, True), (16, False), (16, True), (300, False), (300, True), (1, True)):
        x = torch.randn(m, k, device="cuda").half()
        _poison()
        before = len(triton_path_launches)
        y = gptq_mm_sorted(x, qw, w.qzeros, w.scales, 128, 0, 1)
        assert _rel_err(y, gptq.reference_matmul(x, w)) < TOL[x.dtype]
        assert (len(triton_path_launches) == before) == again
    x = torch.randn(16 * k + 1, device="cuda").half()[1:].view(16, k)  # 2 bytes past an aligned address
    assert _rel_err(gptq_mm_sorted(x, qw, w.qzeros, w.scales, 128, 0, 1), gptq.reference_matmul(x, w)) < TOL[x.dtype]
    x = torch.randn(1, k, device="cuda").half()
    gptq_mm_sorted(x, qw, w.qzeros, w.scales, 128, 0, 1)  # warm: the graph's launches hit the cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gptq_mm_sorted(x, qw, w.qzeros, w.scales, 128, 0, 1)
    for _ in range(2):
        x.copy_(torch.randn(1, k, device="cuda").half())
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(y, gptq.reference_matmul(x, w)) < TOL[x.dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_swiglu_launches_reuse_compiled_kernels_gpu(m):
    """The SwiGLU (two or three launches a call) three times on fresh x through the launcher's cache."""
    from tpaware_compile import gptq
    from tpaware_compile.kernels import gptq_swiglu_sorted
    from test_kernels import TOL, _poison
    gate, up = (_random_weight(4096, 11008, 128, torch.bfloat16) for _ in range(2))
    for _ in range(3):
        x = torch.randn(m, 4096, device="cuda").bfloat16()
        _poison()
        y = gptq_swiglu_sorted(x, (gate.qweight, gate.qzeros, gate.scales), (up.qweight, up.qzeros, up.scales),
                               128, 0, 1)
        g, u = gptq.reference_matmul(x.float(), gate), gptq.reference_matmul(x.float(), up)
        assert _rel_err(y, torch.nn.functional.silu(g) * u) < TOL[x.dtype]
