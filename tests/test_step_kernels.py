"""The CPU kernels of the training step (rar/model/csrc: attention, qkv heads, the fused
bias-GELU-dropout, the norms and residual updates reading the adaLN tables) against torch's ops:
each kernel's outputs and gradients, and tiny training runs with and without them."""
from unittest.mock import patch

import pytest
import torch

from rar.training.loop import train
from test_train import read_metrics, small_config


@pytest.mark.parametrize("B,H,N,D", [(3, 2, 65, 32), (2, 3, 17, 32), (1, 1, 1, 32), (2, 2, 130, 64)])
def test_the_causal_attention_kernel_equals_torch_forward_and_backward(B, H, N, D):
    """csrc/causal_attention.c against torch's scaled_dot_product_attention, with q and k
    qk-normed and v a strided view of the qkv projection as in the model; 1 and 2 threads; lengths
    that are and are not multiples of its 16-wide score blocks. Without grad it is torch's kernel."""
    import torch.nn.functional as F
    from rar.model.causal_attention import attention_kernel, causal_attention

    if attention_kernel(D) is None:
        pytest.skip("the attention kernel cannot be built here")
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    grad = torch.randn(B, N, H, D)

    def heads():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), v not contiguous
        return F.layer_norm(q, (D,)), F.layer_norm(k, (D,)), v

    want = F.scaled_dot_product_attention(*heads(), is_causal=True).transpose(1, 2)
    (want_grad,) = torch.autograd.grad(want, qkv, grad)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = causal_attention(*heads())
            (got_grad,) = torch.autograd.grad(out, qkv, grad)
            assert out.shape == (B, N, H, D) and out.is_contiguous()
            assert torch.allclose(out, want, atol=2e-6) and torch.allclose(got_grad, want_grad, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        assert torch.equal(causal_attention(*heads()), want)


@pytest.mark.parametrize("B,N,H,D", [(3, 65, 2, 32), (1, 1, 1, 32), (2, 33, 4, 64)])
def test_the_qkv_heads_kernel_equals_torch_forward_and_backward(B, N, H, D):
    """csrc/qkv_heads.c (projection bias, qk-norm, head layout) against the projection, view and
    LayerNorms in torch: outputs, and gradients of the input, the projection and both norms, on 1
    and 2 threads (row counts that are and are not multiples of its 64-row work items); the norms'
    gradients and the projection bias's, summed per fixed block of rows, are bit-identical on both
    thread counts."""
    import torch.nn as nn
    from rar.model.qkv_heads import heads_kernel, qkv_heads

    if heads_kernel() is None:
        pytest.skip("the qkv kernel cannot be built here")
    torch.manual_seed(0)
    C = H * D
    qkv, q_norm, k_norm = nn.Linear(C, 3 * C), nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        for p in (*q_norm.parameters(), *k_norm.parameters(), qkv.bias):
            p.add_(torch.randn_like(p) * 0.3)
    params = [*qkv.parameters(), *q_norm.parameters(), *k_norm.parameters()]
    x = torch.randn(B, N, C, requires_grad=True)
    grads_out = [torch.randn(B, H, N, D) for _ in range(3)]

    def run():
        heads = qkv_heads(x, qkv, q_norm, k_norm, H)
        return heads, torch.autograd.grad(heads, [x, *params], grads_out)

    with patch("rar.model.qkv_heads.heads_kernel", lambda: None):  # torch's ops
        want, want_grads = run()
    threads = torch.get_num_threads()
    got_grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got, grads = run()
            got_grads.append(grads)
            for a, b in zip(got, want):
                assert a.shape == (B, H, N, D) and a.is_contiguous()
                torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
            for a, b in zip(grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got_grads[0][2:], got_grads[1][2:]):  # the qkv bias and the norms
        assert torch.equal(a, b)


def test_the_fused_gelu_dropout_trains_as_gelu_then_dropout(tmp_path):
    """The MLP's fused bias-GELU-dropout kernel (CPU, nothing recomputed) against adding fc1's bias,
    GELU, then the same mask written out and multiplied: the same losses within 1e-5 per step, and
    the fused path did run."""
    import torch.nn.functional as F
    from rar.model import dropout as d

    if d.hash_kernel() is None:
        pytest.skip("the dropout kernel cannot be built here")
    fused_calls = []

    def spy(a, mask, p, bias=None):
        fused_calls.append(isinstance(mask, d.HashedMask) and bias is not None)
        return d.gelu_dropout(a, mask, p, bias)

    def unfused(a, mask, p, bias=None):
        a = a if bias is None else a + bias
        return d.apply_mask(F.gelu(a), mask.materialize(a.shape) if isinstance(mask, d.HashedMask) else mask, p)

    losses = {}
    for name, fn in (("fused", spy), ("unfused", unfused)):
        with patch("rar.model.transformer.gelu_dropout", fn):
            train(small_config(tmp_path / name, "max_steps=6", "model.dropout=0.1", "checkpointing=attention"))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert fused_calls and all(fused_calls)
    assert max(abs(a - b) for a, b in zip(losses["fused"], losses["unfused"])) < 1e-5


def test_the_training_kernels_train_as_torchs_ops(tmp_path):
    """The CPU kernels of the step (attention, qkv heads, modulated norms reading the adaLN tables)
    against torch's ops in their place (the same masks): the same losses within 1e-5 per step, and
    each kernel ran in the one run and not in the other."""
    from rar.model import causal_attention as ca, modulated_norm as mn, qkv_heads as qh

    if qh.heads_kernel() is None or mn.norm_kernel() is None or ca.attention_kernel(16) is None:
        pytest.skip("the training kernels cannot be built here")
    functions = (ca._CausalAttention, qh._QKVHeads, mn._ModulatedNorm)
    losses, calls = {}, {}
    for name in ("kernels", "torch"):
        count = {f.__name__: 0 for f in functions}

        def counted(f):
            apply = f.apply

            def run(*args):
                count[f.__name__] += 1
                return apply(*args)
            return run
        off = name == "torch"
        with patch.object(ca, "attention_kernel", (lambda d: None) if off else ca.attention_kernel), \
                patch.object(qh, "heads_kernel", (lambda: None) if off else qh.heads_kernel), \
                patch.object(mn, "norm_kernel", (lambda: None) if off else mn.norm_kernel), \
                patch.multiple(ca._CausalAttention, apply=counted(ca._CausalAttention)), \
                patch.multiple(qh._QKVHeads, apply=counted(qh._QKVHeads)), \
                patch.multiple(mn._ModulatedNorm, apply=counted(mn._ModulatedNorm)):
            train(small_config(tmp_path / name, "max_steps=6", "model.dropout=0.1", "checkpointing=attention"))
        losses[name], calls[name] = [r["loss"] for r in read_metrics(tmp_path / name)], count
    assert all(n > 0 for n in calls["kernels"].values()) and not any(calls["torch"].values())
    assert len(losses["kernels"]) == 6
    assert max(abs(a - b) for a, b in zip(losses["kernels"], losses["torch"])) < 1e-5


@pytest.mark.parametrize("mode", ["attention", "selective"])
def test_bf16_autocast_trains_close_to_fp32_with_the_kernels_stepping_aside(tmp_path, mode):
    """`precision: bf16` (autocast) where the fp32 kernels would otherwise run: they must not see
    the bf16 projections (the qkv kernel reading bf16 as fp32 corrupted memory); torch's ops run,
    and the losses are finite and close to the fp32 run's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        train(small_config(tmp_path / precision, "max_steps=6", "model.dropout=0.1", f"checkpointing={mode}",
                           f"precision={precision}"))
        losses[precision] = [r["loss"] for r in read_metrics(tmp_path / precision)]
    assert len(losses["bf16"]) == 6 and all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])) < 0.02


def test_the_kernels_step_aside_for_inputs_they_cannot_read():
    """A table index that is not contiguous int64 of valid rows, a table beside a plain tensor, or a
    float64 default dtype: the results equal torch's ops (the C code would read garbage or NaN)."""
    from rar.model.dropout import HashedMask, gated_residual
    from rar.model.gather import RowGather
    from rar.model.modulated_norm import modulated_norm
    from rar.model.causal_attention import causal_attention

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    a, c = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    good = torch.tensor([1, 0, 1])
    for index in (good.int(), torch.tensor([1, 9, 0, 9, 1, 9])[::2], torch.tensor([1, 0, 2])):
        ga, gc = RowGather(a, index), RowGather(c, index)
        want = torch.addcmul(c[index.long().clamp(max=1)], torch.nn.functional.layer_norm(x, (8,), eps=1e-6),
                             a[index.long().clamp(max=1)])
        if int(index.max()) > 1:  # out of range: torch's index_select refuses it, as it should
            with pytest.raises((IndexError, RuntimeError)):
                modulated_norm(x, ga, gc, 1e-6)
            continue
        torch.testing.assert_close(modulated_norm(x, ga, gc, 1e-6), want)
        mask = HashedMask(1, 2, 0, 1.0)  # keys (1, 2), nothing dropped
        torch.testing.assert_close(gated_residual(x, ga, x, mask, 0.0), x + a[index.long()] * x)
    mixed = modulated_norm(x, RowGather(a, good), c[good], 1e-6)  # one table, one tensor
    torch.testing.assert_close(mixed, torch.addcmul(c[good], torch.nn.functional.layer_norm(x, (8,), eps=1e-6), a[good]))
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = causal_attention(q, k, v)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
