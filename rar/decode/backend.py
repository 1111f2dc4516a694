"""The decoder backend and the decode step of one block.

`prepare(model)` turns a `rar.RAR` into a `DecodeBackend`: the weights in the layouts a decode
step reads fastest on its device, made once and passed to every `generate` call. The model itself
is never copied, patched or mutated (a bf16 model decoded in fp32, or a `device`/`dtype` change,
works on a converted copy). What the backend holds:
- the folded adaLN (`fold_adaln`): every block's adaLN linear with its LayerNorm affines folded
  in, as ONE linear; the modulation depends only on (class, position), so it is computed for a
  window of positions in one large matmul instead of one skinny matmul per step;
- per block the four linears (on CPU, `DecodeLinear`s whose kernel and layout follow the row
  count and the CPU's capability, among them the compiled `cpu.linear_kernel`) and the
  q/k-norm affines stacked for one fused op;
- the attention over the KV cache: the compiled `cpu.attention_kernel` in fp32 on CPU
  where it can be built, torch's kernels otherwise;
- `description`, which says what runs and why.
`rar.decode.step.cached_step` is one block's step on these weights for any number of new rows;
`rar.decode.cache` runs whole batches through it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.checks import check_counts
from ..core.devices import resolve_device
from ..model.transformer import RAR, BlockModulation, HeadModulation
from .cpu import attention_kernel, linear_kernel
from .cpu.capability import CPUCapability
from .cpu.linear import DecodeLinear
from ..core.toolchain import PROCESS_BUILDS, KernelBuilds


def fold_adaln(model: RAR) -> torch.nn.Linear:
    """Every adaLN linear of the model, with the blocks' LayerNorm affines folded in, as ONE linear
    D -> L * 6D + 2D for the decode step (one matmul per window of positions, one gather per step).

    A block computes modulate(norm(x)) = (x_hat w + b)(1 + scale) + shift with scale and shift
    linear in u = SiLU(condition). So a = w (1 + scale) and c = b (1 + scale) + shift are linear in u
    too, and the step needs x_hat * a + c, one op instead of four. Per block the outputs are laid
    out as `FoldedModulation`; the head's are [1 + scale, shift]. Folded in float64."""
    D, L = model.config.hidden_size, len(model.blocks)
    head = model.adaln_before_head.adaLN_modulation[-1]
    folded = torch.nn.Linear(D, L * 6 * D + 2 * D, device="meta").to_empty(device=head.weight.device)
    folded = folded.to(head.weight.dtype).requires_grad_(False)  # every value is set below
    for i, blk in enumerate(model.blocks):  # one block at a time in float64: little extra memory
        lin = blk.adaLN_modulation[-1]
        W = BlockModulation.split(lin.weight.detach().double(), dim=0)  # each (D, D)
        b = BlockModulation.split(lin.bias.detach().double(), dim=0)  # each (D,)
        parts = []
        for norm, shift, scale, gate in ((blk.norm1, "shift_msa", "scale_msa", "gate_msa"),
                                         (blk.norm2, "shift_mlp", "scale_mlp", "gate_mlp")):
            w, nb = norm.weight.detach().double(), norm.bias.detach().double()
            Wsh, Wsc, bsh, bsc = getattr(W, shift), getattr(W, scale), getattr(b, shift), getattr(b, scale)
            parts += [(w[:, None] * Wsc, w * (1 + bsc)), (nb[:, None] * Wsc + Wsh, nb * (1 + bsc) + bsh),
                      (getattr(W, gate), getattr(b, gate))]
        folded.weight[i * 6 * D:(i + 1) * 6 * D] = torch.cat([p[0] for p in parts])
        folded.bias[i * 6 * D:(i + 1) * 6 * D] = torch.cat([p[1] for p in parts])
    Wh = HeadModulation.split(head.weight.detach(), dim=0)
    bh = HeadModulation.split(head.bias.detach().double(), dim=0)
    folded.weight[L * 6 * D:] = torch.cat([Wh.scale, Wh.shift])
    folded.bias[L * 6 * D:] = torch.cat([1 + bh.scale, bh.shift])
    return folded.requires_grad_(False)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           starts: torch.Tensor | None = None,
                           new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q (R, H, Dh) and k, v (R, H, L, Dh): (R, H * Dh), with torch's
    kernels (the compiled `attention_kernel` has the same signature). `starts` (R,), if given, is
    each row's first position to attend to (the slots before it are padding); `new` = (k_new,
    v_new) (R, H, Dh), if given, is written to position L - 1 of k and v first. fp32 uses torch's
    fused kernel. In bf16 that kernel is slower on CPU than two matmuls around an fp32 softmax
    (BENCHMARKS.md), so those are used there; their scores are rounded to bf16 before the
    softmax, which about doubles the fused kernel's error against fp32 (the test bounds it)."""
    R, H, Dh = q.shape
    if new is not None:
        k[:, :, -1], v[:, :, -1] = new
    q = q[:, :, None]  # (R, H, 1, Dh)
    valid = None if starts is None else (torch.arange(k.shape[2], device=k.device) >= starts[:, None])[:, None, None]
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid).view(R, H * Dh)  # valid (R, 1, 1, L)
    scores = torch.matmul(k, q.transpose(-1, -2)).float() * Dh ** -0.5  # (R, H, L, 1): k-major reads
    scores = scores.transpose(-1, -2)  # (R, H, 1, L)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(R, H * Dh)


@dataclass(frozen=True)
class DecodeBlock:
    """One block's weights as the decode step uses them."""
    qkv: Callable[[torch.Tensor], torch.Tensor]
    proj: Callable[[torch.Tensor], torch.Tensor]
    fc1: Callable[[torch.Tensor], torch.Tensor]
    fc2: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    qk_weight: torch.Tensor  # (2, 1, Dh): q-norm and k-norm weights stacked
    qk_bias: torch.Tensor  # (2, 1, Dh)
    norm_eps: float
    qk_eps: float
    num_heads: int


class DecodeBackend:
    """A model prepared for decoding (see the module docstring); made by `prepare`."""

    def __init__(self, model: RAR, linear: Callable[[torch.nn.Linear], Callable], adaln: Callable,
                 attention: Callable, attention_name: str, description: str, packed: bool = False):
        self.model, self.config, self.sampling = model, model.config, model.sampling
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.adaln, self.attention, self.attention_name = adaln, attention, attention_name
        self.description, self.packed = description, packed
        self.blocks = [DecodeBlock(linear(b.attn.qkv), linear(b.attn.proj), linear(b.mlp.fc1), linear(b.mlp.fc2),
                                   b.mlp.act, *(torch.stack([getattr(b.attn.q_norm, n), getattr(b.attn.k_norm, n)])
                                                .detach()[:, None] for n in ("weight", "bias")),
                                   b.norm1.eps, b.attn.q_norm.eps, b.attn.num_heads) for b in model.blocks]
        self.head = linear(model.lm_head)
        self.head_eps = model.adaln_before_head.norm_final.eps

    def prepare_rows(self, rows: int) -> None:
        """Build now the weight layouts of decode steps of `rows` rows (a batch of B with guidance
        has 2B), instead of on their first use."""
        for b in self.blocks:
            for lin in (b.qkv, b.proj, b.fc1, b.fc2):
                if isinstance(lin, DecodeLinear):
                    lin.prepare(rows)
        if isinstance(self.head, DecodeLinear):
            self.head.prepare(rows)

    def __repr__(self) -> str:
        return f"DecodeBackend({self.description})"


def _converted(model: RAR, device, dtype) -> RAR:
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or p.dtype
    if (device, dtype) == (p.device, p.dtype):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()  # the caller's model stays as it is


def _check_prepare_args(model, device, dtype, rows) -> None:
    """What `prepare` is given, each a ValueError or TypeError naming the argument before any work."""
    if not isinstance(model, RAR):
        raise TypeError(f"model must be a rar.RAR (e.g. rar.from_pretrained(...)), got {type(model).__name__}.")
    if device is not None:
        resolve_device(str(device))  # one sentence for a device torch lacks (mps, cuda on a CPU-only build, a typo)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}.")
    if rows is not None:
        check_counts(rows=rows)  # rows per decode step: 2 x batch with guidance


def prepare(model: RAR, *, device=None, dtype: torch.dtype | None = None, rows: int | None = None,
            attention_kernel: bool = True, packed: bool = True, compiled_linear: bool = True,
            capability: CPUCapability | None = None, builds: KernelBuilds = PROCESS_BUILDS) -> DecodeBackend:
    """The model prepared for decoding on `device` in `dtype` (default: the model's own).

    On CPU with `packed`, each linear gets the kernel and weight layout that `capability` picks per
    row count (`CPUCapability.detect()` when None: this CPU and torch's dispatch level; tests force
    others); a bf16 model is decoded in fp32 on a CPU without oneDNN bf16 kernels; in fp32 with
    `attention_kernel`, attention runs in the compiled kernel where it can be built, and with
    `compiled_linear` the row counts `CPUCapability.kernel` gives to `linear_kernel` run there
    where it can be built. Compiled kernels come from `builds` (the process-wide cache by default:
    each is compiled once per process). `rows` builds the layouts of that row count now (about a
    second or two for RAR-B on a 2-core CPU; BENCHMARKS.md); otherwise each is built on first use.
    `packed=False` (or any other device) uses the model's own linears and torch's attention."""
    _check_prepare_args(model, device, dtype, rows)
    model = _converted(model, device, dtype)
    p = next(model.parameters())
    if p.device.type != "cpu" or not packed:
        return DecodeBackend(model, lambda lin: lin, fold_adaln(model), single_query_attention, "torch attention",
                             f"{p.device.type} {str(p.dtype).removeprefix('torch.')}: torch modules, "
                             "folded adaLN, torch attention")
    cap = capability or CPUCapability.detect()
    notes = []
    compute = cap.compute_dtype(p.dtype)
    if compute != p.dtype:
        notes.append(f"{str(p.dtype).removeprefix('torch.')} weights decoded in {str(compute).removeprefix('torch.')}: "
                     "this CPU has no oneDNN bf16 kernels (they need AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
        model = _converted(model, None, compute)
    attention, attention_name = single_query_attention, "torch attention"
    if compute == torch.float32 and attention_kernel:
        kernel = attention_kernel_for(model.config.head_dim, cap, builds)
        if isinstance(kernel, str):
            attention_name = f"torch attention ({kernel})"
        else:
            attention, attention_name = kernel, f"rar.attention_kernel ({' '.join(kernel.flags) or 'default flags'})"
    few_rows = None
    if compute == torch.float32 and compiled_linear:
        few_rows = linear_kernel.load(cap.compiler_flags(), builds)
        if few_rows is None:
            notes.append(f"no rar.linear_kernel ({linear_kernel.unavailable_reason(cap.compiler_flags(), builds)})")
    kernels = {r: cap.kernel(compute, r, compiled=few_rows is not None) for r in (1, 2, 16)}
    text = (f"cpu ({cap.describe()}): {str(compute).removeprefix('torch.')} linears "
            + ", ".join(f"{r} rows {k}" for r, k in kernels.items()) + f"; attention: {attention_name}")
    backend = DecodeBackend(model, lambda lin: DecodeLinear(lin, cap, few_rows=few_rows),
                            DecodeLinear(fold_adaln(model), cap, keep_plain=False), attention, attention_name,
                            "; ".join([text, *notes]), packed=True)
    if rows is not None:
        backend.prepare_rows(rows)
    return backend


def attention_kernel_for(head_dim: int, cap: CPUCapability, builds: KernelBuilds = PROCESS_BUILDS):
    """The compiled kernel for this head size and CPU, or the reason there is none (a str)."""
    kernel = attention_kernel.load(head_dim, cap.compiler_flags(), builds)
    return kernel if kernel is not None else attention_kernel.unavailable_reason(head_dim, cap.compiler_flags(), builds)
