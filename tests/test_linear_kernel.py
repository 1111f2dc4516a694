"""The compiled few-rows linear (`rar.decode.cpu.linear_kernel`) against float64 and torch's fp32."""
import pytest
import torch
import torch.nn.functional as F

from rar.decode.cpu import linear_kernel
from rar.decode.cpu.capability import CPUCapability
from tests.conftest import CAN_COMPILE

CAN_BUILD = CAN_COMPILE and CPUCapability.detect().isa in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux, a C compiler, an OpenMP torch and AVX2")


def _kernel():
    kernel = linear_kernel.load(CPUCapability.detect().compiler_flags())
    assert kernel is not None, linear_kernel.unavailable_reason(CPUCapability.detect().compiler_flags())
    return kernel


def test_pack_lays_out_chunks_then_panels_then_k():
    N, K = 7, linear_kernel.CHUNK + 3  # a last panel of 1 column, a last chunk of 3
    W = torch.arange(N * K, dtype=torch.float32).view(N, K)
    packed = linear_kernel.pack(W)
    P, C = 2, linear_kernel.CHUNK
    assert packed.shape == (P * linear_kernel.PANEL * K,)
    first = packed[:P * 6 * C].view(P, C, 6)  # chunk 0: panel, k, column
    assert torch.equal(first[1, 5, 0], W[6, 5]) and torch.equal(first[0, 2, 3], W[3, 2])
    assert torch.equal(first[1, :, 1:], torch.zeros(C, 5))  # columns past N are zero
    last = packed[P * 6 * C:].view(P, 3, 6)
    assert torch.equal(last[0, 2, 4], W[4, C + 2])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 17, 24, 40])
@pytest.mark.parametrize("n,k", [(1, 1), (29, 300), (768, 256)])
def test_kernel_is_as_accurate_as_torch(rows, n, k):
    """Within 4x torch's fp32 error against float64 (both sum in fp32, in different orders)."""
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    torch_err = (F.linear(x, w, b) - exact).abs().max()
    out = _kernel()(x, linear_kernel.pack(w), b, n)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert (out - exact).abs().max() <= 4 * torch_err + 1e-6
    assert torch.equal(_kernel()(x, linear_kernel.pack(w), None, n) + b, out)  # the bias is added last, in fp32


@needs_kernel
def test_a_row_does_not_depend_on_the_other_rows_or_the_thread_count():
    """Every output is summed in one order: a row alone, in a batch of 16 or 40 (other row groups),
    with 1 or 2 threads, gives the same bits. So sampling stays independent of the batch size."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(40, 700, generator=g), torch.randn(300, 700, generator=g), torch.randn(300, generator=g)
    packed, kernel = linear_kernel.pack(w), _kernel()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernel(x, packed, b, 300)
        torch.set_num_threads(1)
        assert torch.equal(kernel(x, packed, b, 300), full)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 7, 20, 39):
        assert torch.equal(kernel(x[r:r + 1], packed, b, 300), full[r:r + 1])
    assert torch.equal(kernel(x[:16], packed, b, 300), full[:16])


@needs_kernel
def test_kernel_rejects_other_inputs_and_cpus():
    kernel, w = _kernel(), torch.randn(10, 20)
    with pytest.raises(ValueError, match="few_rows_linear expects fp32 CPU x"):
        kernel(torch.randn(3, 20).double(), linear_kernel.pack(w), None, 10)
    with pytest.raises(ValueError, match=r"packed \(N=11, K=20\)"):
        kernel(torch.randn(3, 20), linear_kernel.pack(w)[:-6], None, 11)
    with pytest.raises(ValueError, match="few_rows_linear expects"):
        kernel(torch.randn(3, 20), linear_kernel.pack(w), torch.randn(9), 10)  # a bias of the wrong size
    with pytest.raises(ValueError, match="few_rows_linear expects"):
        kernel(torch.randn(3, 0), linear_kernel.pack(torch.randn(10, 0)), None, 10)  # no inputs to sum over
    with pytest.raises(RuntimeError, match="needs AVX2 and FMA"):
        linear_kernel.build(flags=[])
    assert linear_kernel.load(flags=[]) is None and "needs AVX2" in linear_kernel.unavailable_reason(flags=[])
