"""The compiled single-query attention kernel against torch's, and the sampler with and without it."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rar.core import toolchain
from rar.decode.cpu import attention_kernel
from rar.decode.cpu.capability import CPUCapability
from rar.inference import cached_logits, generate, prepare
from rar.decode.backend import single_query_attention
from tests.conftest import CAN_COMPILE, LINUX_OPENMP

FLAGS = CPUCapability.detect().compiler_flags()  # this CPU's

needs_kernel = pytest.mark.skipif(not CAN_COMPILE, reason="needs Linux, a C compiler and an OpenMP build of torch")


def cache_slices(g, rows, heads, length, head_dim, scale=1.0):
    """q as the decode step has it (a strided view of the q/k pair), k and v as slices of a cache;
    q and k layer-normed with weight `scale`, as RAR's q/k-norm leaves them."""
    q = F.layer_norm(torch.randn(rows, 2, heads, head_dim, generator=g), (head_dim,))[:, 0] * scale  # (R, H, Dh)
    k, v = (torch.randn(rows, heads, 257, head_dim, generator=g)[:, :, :length] for _ in range(2))
    return q, F.layer_norm(k, (head_dim,)) * scale, v


@needs_kernel
@pytest.mark.parametrize("head_dim", [32, 48, 64, 88])  # tiny, RAR-B, RAR-L, RAR-XXL
@pytest.mark.parametrize("length,scale", [(1, 1.0), (2, 1.0), (37, 1.0), (257, 1.0), (37, 3.0), (257, 5.0)])
def test_kernel_is_as_accurate_as_torch_attention(head_dim, length, scale):
    """Against a float64 reference, within 2x the error of torch's fused fp32 kernel. (Scale 5 gives
    scores up to ~100; much larger scores make both kernels' errors grow with the scores' rounding.)"""
    kernel = attention_kernel.load(head_dim, FLAGS)
    assert kernel is not None, attention_kernel.unavailable_reason(head_dim, FLAGS)
    q, k, v = cache_slices(torch.Generator().manual_seed(length), 6, 4, length, head_dim, scale)
    exact = F.scaled_dot_product_attention(q[:, :, None].double(), k.double(), v.double()).view(6, -1)
    torch_err = (F.scaled_dot_product_attention(q[:, :, None], k, v).view(6, -1) - exact).abs().max()
    out = kernel(q, k, v)
    assert out.shape == (6, 4 * head_dim) and out.dtype == torch.float32
    assert (out - exact).abs().max() <= 2 * torch_err + 1e-7


@needs_kernel
@pytest.mark.parametrize("with_starts", [False, True])
def test_the_fused_cache_write_equals_writing_first(with_starts):
    """`new=(k_new, v_new)` stores them at the last position and attends exactly as if they had been
    written there before the call (the decode step's write, fused into the kernel), for the kernel
    and torch's fallback alike; the other positions are left as they were."""
    kernel = attention_kernel.load(48, FLAGS)
    assert kernel is not None, attention_kernel.unavailable_reason(48, FLAGS)
    g = torch.Generator().manual_seed(3)
    q, k, v = cache_slices(g, 5, 4, 40, 48)
    pair = F.layer_norm(torch.randn(5, 2, 4, 48, generator=g), (48,))  # (R, 2, H, Dh): a strided k_new
    k_new, v_new = pair[:, 1], torch.randn(5, 3, 4, 48, generator=g)[:, 2]
    starts = torch.tensor([0, 3, 0, 39, 7]) if with_starts else None
    for attend in (kernel, single_query_attention):
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        k1[:, :, -1], v1[:, :, -1] = k_new, v_new
        expected = attend(q, k1, v1, starts)
        assert torch.equal(attend(q, k2, v2, starts, new=(k_new, v_new)), expected)
        assert torch.equal(k2, k1) and torch.equal(v2, v1)
    with pytest.raises(ValueError, match="expects fp32 CPU q"):
        kernel(q, k, v, new=(k_new.double(), v_new))


@needs_kernel
def test_kernel_does_not_depend_on_the_thread_count_and_rejects_other_inputs():
    kernel = attention_kernel.load(48, FLAGS)
    assert kernel is not None, attention_kernel.unavailable_reason(48, FLAGS)
    q, k, v = cache_slices(torch.Generator().manual_seed(0), 7, 5, 99, 48)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v)
        torch.set_num_threads(2)
        assert torch.equal(kernel(q, k, v), one)  # each (row, head) is computed whole by one thread
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="expects fp32 CPU q"):
        kernel(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="expects fp32 CPU q"):
        kernel(q, k.transpose(2, 3), v.transpose(2, 3))  # positions not contiguous
    with pytest.raises(ValueError, match="expects fp32 CPU q"):
        kernel(q, k.to("meta"), v)  # a pointer the C code cannot read
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # the output is fp32 whatever the default
        assert torch.equal(kernel(q, k, v), one)
    finally:
        torch.set_default_dtype(default)


@needs_kernel
def test_a_kernel_on_another_openmp_runtime_is_refused(monkeypatch):
    monkeypatch.setattr(toolchain, "_torch_openmp", lambda: "/elsewhere/libgomp.so.1")
    with pytest.raises(RuntimeError, match=r"OpenMP runtime \(.*libgomp.*\) is not torch's \(/elsewhere/libgomp.so.1\)"):
        attention_kernel.build(48, FLAGS)


@needs_kernel
def test_sampler_runs_the_kernel_with_the_same_results(tiny_official, rar_reference, monkeypatch):
    with_kernel = prepare(tiny_official)
    without = prepare(tiny_official, attention_kernel=False)
    assert with_kernel.attention_name.startswith("rar.attention_kernel (")
    assert isinstance(with_kernel.attention, attention_kernel.SingleQueryAttention)
    assert without.attention is single_query_attention and without.attention_name == "torch attention"
    bf16 = prepare(copy.deepcopy(tiny_official).to(torch.bfloat16))  # (Module.to converts in place)
    # fp32 only: a bf16 model uses torch's attention, unless this CPU decodes it in fp32
    assert (bf16.attention is single_query_attention) == (bf16.dtype == torch.bfloat16)
    calls = []
    fn = with_kernel.attention._fn  # the process's kernel: patched for this test only
    monkeypatch.setattr(with_kernel.attention, "_fn", lambda *a: calls.append(a[13]) or fn(*a))  # lengths
    labels = rar_reference["greedy_labels"]
    tokens = generate(with_kernel, labels, guidance_scale=16.0, guidance_scale_pow=2.75, top_k=1)
    assert torch.equal(tokens, rar_reference["greedy_tokens"]["g16.0_pow2.75"])
    cfg = tiny_official.config
    assert calls == [n for n in range(1, cfg.num_tokens + 2) for _ in range(cfg.num_layers)]
    seq = torch.randint(0, cfg.codebook_size, (4, cfg.num_tokens), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([1, 2, cfg.num_classes, cfg.num_classes])
    torch.testing.assert_close(cached_logits(with_kernel, seq, rows), cached_logits(without, seq, rows),
                               rtol=0, atol=1e-5)


@pytest.mark.skipif(not LINUX_OPENMP, reason="elsewhere the kernel is refused before looking for a compiler")
def test_without_a_compiler_the_sampler_says_so_and_uses_torch(tiny_official, rar_reference, monkeypatch):
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    packed = prepare(tiny_official, builds=toolchain.KernelBuilds())  # a fresh cache: nothing built yet
    assert packed.attention is single_query_attention
    assert packed.attention_name == "torch attention (no C compiler (cc or gcc) on PATH)"
    assert "attention: torch attention (no C compiler" in packed.description
    assert "no rar.linear_kernel (no C compiler" in packed.description and "few_rows" not in packed.description
    tokens = generate(packed, rar_reference["greedy_labels"], guidance_scale=4.0, guidance_scale_pow=0.0, top_k=1)
    assert torch.equal(tokens, rar_reference["greedy_tokens"]["g4.0_pow0.0"])


def test_caches_longer_than_the_kernel_takes_use_torch_attention(tiny_official, monkeypatch):
    from rar.decode.cache import CachedDecoder
    packed = prepare(tiny_official)
    labels, order = torch.tensor([1, 2]), torch.arange(tiny_official.config.num_tokens)
    assert CachedDecoder(packed, labels, order).attention is packed.attention
    monkeypatch.setattr(attention_kernel, "MAX_LENGTH", tiny_official.config.num_tokens)  # one slot short
    assert CachedDecoder(packed, labels, order).attention is single_query_attention
