"""Sampling: raster-order (or any scan order) decoding with a preallocated KV cache and
classifier-free guidance on a cosine schedule (paper Sec. 4.1; upstream `RAR.generate`).

Why this is faster than upstream at identical outputs (tokens equal; logits within fp32 rounding):
- the adaLN modulation depends only on (class, position), so it is computed for a window of
  positions in one large matmul instead of one skinny matmul per step (about a third of the
  FLOPs, and at batch 1 a third of the weights streamed per step); all blocks' adaLN linears are
  one folded linear that also absorbs the LayerNorm affines (`fold_adaln`), so a step gathers its
  modulation in one op and modulates with one `addcmul`;
- on CPU each linear layer streams its weight in the layout fastest for the step's row count:
  `mm(W, x.t())` over column blocks at 1-2 rows (batch 1 with guidance), oneDNN's pre-packed
  layout above (`pack_for_cpu`, once per process);
- the KV cache is preallocated (no `torch.cat` growth), and each step embeds only the new token
  instead of re-embedding the prefix and repeating full position tables;
- in fp32 on CPU, attention over the cache runs in a small compiled kernel that streams it at the
  machine's bandwidth (`rar.attention_kernel`, built once per process; torch's kernel otherwise).

Randomness: sample i uses its own generator seeded from (seed, indices[i]), with all its uniforms
drawn up front, so a sample does not depend on the batch it is in or the process that draws it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .attention_kernel import MAX_LENGTH, load as load_attention_kernel, unavailable_reason
from .model import KVCache, RAR

# Precomputed adaLN outputs held at once. 32 MiB is glibc's largest mmap threshold: a window that
# fits is recycled from the heap instead of faulting in fresh pages (measured ~7% faster window
# matmuls than 256 MiB windows, and ~200 MiB less peak memory at RAR-B batch 8) ...
MOD_BUDGET_BYTES = 32 * 2**20
MIN_WINDOW_ROWS = 64  # ... unless that leaves a window matmul fewer rows than this (slower kernels)


GEMV_MAX_ROWS = 2  # up to this many rows (batch 1 with guidance), fp32 weights stream through mm(W, x.t())
GEMV_K_CHUNK = 1024  # ... in column blocks of at most this width


class _PackedLinear(torch.nn.Module):
    """nn.Linear for CPU decode steps, with its weight in the layout that streams fastest for the
    number of rows. Measured on a 2-core CPU (benchmarks/sample_speed.py; BENCHMARKS.md), F.linear
    (MKL sgemm on W^T) reads weights at ~8 GB/s at 2-16 rows. From 3 rows on, oneDNN's pre-packed
    blocked layout reaches ~20 GB/s. At 1-2 rows `mm(W, x.t())` reaches ~32 GB/s, close to what the
    machine can read (fp32; in bf16 the packed kernel is faster at every row count), but only
    while a row of W is at most ~1.5k floats: wider weights (fc2) are split into contiguous column
    blocks whose products are summed. Each layout is built on first use and kept (a layout never
    used costs no memory). `gemv=False` packs at once and drops the plain weight: for a linear
    only ever applied to many rows (the folded adaLN)."""

    def __init__(self, linear: torch.nn.Linear, gemv: bool = True):
        super().__init__()
        self.weight, self.bias = linear.weight.detach(), linear.bias
        self.shape = tuple(self.weight.shape)  # (N, K)
        self._packed: torch.Tensor | None = None
        self._blocks: tuple[torch.Tensor, ...] | None = None
        if not gemv:
            self._packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None), None

    def _gemv(self, rows: int) -> bool:
        """Whether `rows` rows take the mm(W, x.t()) path (fp32 only: in bf16 the packed kernel is faster)."""
        return rows <= GEMV_MAX_ROWS and self.weight is not None and self.weight.dtype == torch.float32

    def prepare(self, rows: int) -> None:
        """Build (once) the layout used for `rows` rows."""
        if not self._gemv(rows):
            if self._packed is None:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
        elif self._blocks is None:
            self._blocks = tuple(w.contiguous() for w in self.weight.split(GEMV_K_CHUNK, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        rows = x.numel() // K
        self.prepare(rows)
        if not self._gemv(rows):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        # x.t() must be a transposed view of a contiguous x: MKL is ~4x slower on a (K, rows) one.
        xs = x.reshape(rows, K).contiguous().split(GEMV_K_CHUNK, dim=1)
        first = (self._blocks[0], xs[0].t())
        out = torch.mm(*first) if self.bias is None else torch.addmm(self.bias[:, None], *first)  # (N, rows)
        for w, xc in zip(self._blocks[1:], xs[1:]):
            out.addmm_(w, xc.t())
        return out.t().reshape(*x.shape[:-1], N)


def _packed_clone(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """A shallow copy of the module tree sharing every tensor, with each nn.Linear packed except
    those under a submodule named in `skip`."""
    import copy

    def pack(name, child):
        if name in skip:
            return child
        return _PackedLinear(child) if type(child) is torch.nn.Linear else _packed_clone(child, skip)

    clone = copy.copy(module)
    clone._modules = {name: pack(name, child) for name, child in module._modules.items()}
    return clone


def is_packed(model: torch.nn.Module) -> bool:
    return hasattr(model, "folded_adaln")


def pack_for_cpu(model: RAR, rows: int | None = None, attention_kernel: bool = True) -> RAR:
    """The model for CPU decoding: linear layers that pick their kernel and weight layout by the
    number of rows (`_PackedLinear`; same outputs up to fp32 rounding, ~1e-6 relative), the
    folded adaLN of `fold_adaln` and, in fp32 with `attention_kernel`, the compiled attention
    kernel of `rar.attention_kernel` (None where it cannot be built; `attention_backend` says
    which attention runs); the model itself is left untouched. Each weight layout is built
    on its first use, or now for decode steps of `rows` rows (a batch of B with guidance has 2B);
    with them, preparing RAR-B takes 0.4-0.7 s on a 2-core CPU (BENCHMARKS.md). Do it once and
    pass the result to every `generate` call.
    Returns `model` unchanged where the packed kernels do not apply (not on CPU, no oneDNN,
    a dtype other than fp32/bf16, already packed)."""
    p = next(model.parameters())
    usable = (p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) and not is_packed(model)
              and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    if not usable:
        return model
    clone = _packed_clone(model, skip=("adaLN_modulation",))  # decoding uses the folded copy instead
    clone.folded_adaln = _PackedLinear(fold_adaln(model), gemv=False)  # derived once here, not per call
    clone.attention_kernel = None
    clone.attention_backend = ("torch scaled_dot_product_attention" if p.dtype == torch.float32
                               else "torch matmuls around an fp32 softmax (bf16)")
    if attention_kernel and p.dtype == torch.float32:
        clone.attention_kernel = load_attention_kernel(model.config.head_dim)
        why_not = unavailable_reason(model.config.head_dim)
        clone.attention_backend = f"torch scaled_dot_product_attention ({why_not})" if why_not else "rar.attention_kernel"
    if rows is not None:
        for lin in clone.modules():
            if isinstance(lin, _PackedLinear):
                lin.prepare(rows)
    return clone


def guidance_schedule(guidance_scale: float, power: float, num_steps: int) -> torch.Tensor:
    """(T,) float32 scales 1 + (g - 1)(1 - cos(pi (t/T)^p)) / 2 with upstream's rounding: (t/T)^p in
    float64 (a Python float raised to a tensor), the rest in float32. p = 0 gives the constant g (0^0 = 1)."""
    t = torch.arange(num_steps, dtype=torch.float64) / num_steps
    ramp = (t ** float(power)).float()  # (T,)
    step = (1 - torch.cos(ramp * torch.pi)) * 1 / 2
    return (guidance_scale - 1) * step + 1


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run with `seed` (independent streams per sample)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def fold_adaln(model: RAR) -> torch.nn.Linear:
    """Every adaLN linear of the model, with the blocks' LayerNorm affines folded in, as ONE linear
    D -> L * 6D + 2D for the decode step (one matmul per window of positions, one gather per step).

    A block computes modulate(norm(x)) = (x_hat w + b)(1 + scale) + shift with scale and shift
    linear in u = SiLU(condition). So a = w (1 + scale) and c = b (1 + scale) + shift are linear in u
    too, and the step needs x_hat * a + c, one op instead of four. Per block the outputs are
    [a1, c1, gate1, a2, c2, gate2]; the head's are [1 + scale, shift]. Folded in float64."""
    D, L = model.config.hidden_size, len(model.blocks)
    head = model.adaln_before_head.adaLN_modulation[-1]
    folded = torch.nn.Linear(D, L * 6 * D + 2 * D, device="meta").to_empty(device=head.weight.device)
    folded = folded.to(head.weight.dtype).requires_grad_(False)  # every value is set below
    for i, blk in enumerate(model.blocks):  # one block at a time in float64: little extra memory
        lin = blk.adaLN_modulation[-1]
        W, bias = lin.weight.detach().double().chunk(6, dim=0), lin.bias.detach().double().chunk(6)
        rows, biases = [], []
        for half, norm in ((0, blk.norm1), (3, blk.norm2)):
            w, b = norm.weight.detach().double(), norm.bias.detach().double()
            (Wsh, Wsc, Wg), (bsh, bsc, bg) = W[half:half + 3], bias[half:half + 3]
            rows += [w[:, None] * Wsc, b[:, None] * Wsc + Wsh, Wg]
            biases += [w * (1 + bsc), b * (1 + bsc) + bsh, bg]
        folded.weight[i * 6 * D:(i + 1) * 6 * D] = torch.cat(rows)
        folded.bias[i * 6 * D:(i + 1) * 6 * D] = torch.cat(biases)
    bsc, bsh = head.bias.detach().chunk(2)  # official chunk order (scale, shift)
    folded.weight[L * 6 * D:] = head.weight.detach()
    folded.bias[L * 6 * D:] = torch.cat([1 + bsc.double(), bsh.double()])
    return folded.requires_grad_(False)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q (R, H, Dh) and k, v (R, H, L, Dh): (R, H * Dh), with torch's
    kernels (the compiled `rar.attention_kernel` has the same signature). fp32 uses torch's fused
    kernel. In bf16 that kernel is 2-3x slower on CPU than two matmuls around an fp32 softmax
    (BENCHMARKS.md), so those are used there; their scores are rounded to bf16 before the
    softmax, which gives about twice the fused kernel's error against fp32 (2.2x in the test)."""
    R, H, Dh = q.shape
    q = q[:, :, None]  # (R, H, 1, Dh)
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v).view(R, H * Dh)
    scores = torch.matmul(k, q.transpose(-1, -2)).float() * Dh ** -0.5  # (R, H, L, 1): k-major reads
    return torch.matmul(scores.transpose(-1, -2).softmax(-1).to(v.dtype), v).view(R, H * Dh)


def _decode_block(blk, x: torch.Tensor, mod: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], pos: int,
                  qk_weight: torch.Tensor, qk_bias: torch.Tensor, attention=_single_query_attention):
    """`Block.forward` for one new position per row, written for speed (fewer, fused ops; the cache
    is written in place; 2-D rows so that no linear output needs a reshape): x (R, D), mod (R, 6D)
    from `fold_adaln`, the new keys and values go to slot `pos` and attention reads slots 0..pos;
    qk_weight/qk_bias (2, 1, Dh) are the q-norm and k-norm affines stacked; `attention` is
    `_single_query_attention` or the compiled kernel. Equal to the block up to fp32 rounding."""
    R, D = x.shape
    attn, mlp = blk.attn, blk.mlp
    H, Dh = attn.num_heads, attn.head_dim
    a1, c1, gate1, a2, c2, gate2 = mod.chunk(6, dim=-1)
    qkv = attn.qkv(torch.addcmul(c1, F.layer_norm(x, (D,), eps=1e-6), a1))  # (R, 3D)
    qk = F.layer_norm(qkv[:, :2 * D].reshape(R, 2, H, Dh), (Dh,), eps=1e-6)  # q-norm and k-norm in one call
    q, k = torch.addcmul(qk_bias, qk, qk_weight).unbind(1)  # (R, H, Dh) each
    k_buf, v_buf = kv  # (R, H, S, Dh)
    k_buf[:, :, pos] = k
    v_buf[:, :, pos] = qkv[:, 2 * D:].view(R, H, Dh)
    out = attention(q, k_buf[:, :, :pos + 1], v_buf[:, :, :pos + 1])  # (R, D)
    x = torch.addcmul(x, gate1, attn.proj(out))
    h = torch.addcmul(c2, F.layer_norm(x, (D,), eps=1e-6), a2)
    return torch.addcmul(x, gate2, mlp.fc2(mlp.act(mlp.fc1(h))))  # (R, D)


class CachedDecoder:
    """Runs one batch of rows through the model position by position with a KV cache.

    rows (R,) labels in [0, C]; order (T,) raster indices in generation order. `prefill()` returns
    the logits predicting order[0]; `step(tok, j)` feeds the token at order[j] and returns the
    logits predicting order[j + 1].
    """

    def __init__(self, model: RAR, rows: torch.Tensor, order: torch.Tensor):
        cfg = model.config
        self.model, self.rows, self.order = model, rows, order
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(cfg, rows.shape[0], device=rows.device, dtype=dtype)
        # Distinct labels only (with guidance all unconditional rows share one label).
        self.labels, self.inverse = torch.unique(rows, return_inverse=True)  # (U,), (R,)
        self.cond = F.silu(model.condition(self.labels))  # (U, T+1, D): the adaLN input
        self.adaln = model.folded_adaln if is_packed(model) else fold_adaln(model)
        kernel = getattr(model, "attention_kernel", None)
        fits = self.cache.keys.shape[3] <= MAX_LENGTH
        self.attention = kernel if kernel is not None and fits else _single_query_attention
        self.qk_norms = [tuple(torch.stack([getattr(b.attn.q_norm, n), getattr(b.attn.k_norm, n)])[:, None]
                               for n in ("weight", "bias")) for b in model.blocks]  # [((2, 1, Dh), (2, 1, Dh))]
        per_slot = self.labels.numel() * cfg.hidden_size * (6 * cfg.num_layers + 2) * self.cond.element_size()
        rows_floor = -(-MIN_WINDOW_ROWS // self.labels.numel())  # positions
        self.window = max(1, min(cfg.num_tokens + 1, max(rows_floor, MOD_BUDGET_BYTES // per_slot)))
        self.win_start, self.win_mods = None, None
        # (R, L*6D + 2D): one step's modulations, reused (a fresh multi-MB tensor per step costs page faults)
        self.step_mods = self.cond.new_empty(rows.shape[0], cfg.hidden_size * (6 * cfg.num_layers + 2))

    def _step_mods(self, pos: int) -> list[torch.Tensor]:
        """Folded adaLN outputs at position `pos` for every row: [(R, 6D)] * layers + [(R, 2D)]."""
        if self.win_start is None or not self.win_start <= pos < self.win_start + self.window:
            self.win_start, self.win_mods = pos, None
            self.win_mods = self.adaln(self.cond[:, pos:pos + self.window])  # (U, W, L*6D + 2D)
        i = pos - self.win_start
        mods = torch.index_select(self.win_mods[:, i], 0, self.inverse, out=self.step_mods)  # (R, L*6D + 2D)
        D = self.cond.shape[-1]
        return list(mods.split([6 * D] * (len(self.model.blocks)) + [2 * D], dim=-1))

    def prefill(self) -> torch.Tensor:
        """[cls] then [class], one position at a time (causal, so the same as both at once)."""
        x = self.model.embed_prefix(self.rows, self.order[0].expand(self.rows.shape[0]))  # (R, 2, D)
        self._forward(x[:, :1], 0)
        return self._forward(x[:, 1:], 1)

    def step(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        R = self.rows.shape[0]
        here = self.order[j].expand(R, 1)
        nxt = self.order[j + 1].expand(R, 1)
        return self._forward(self.model.embed_tokens(tokens.view(R, 1), here, nxt), j + 2)

    def _forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x (R, 1, D) at position `pos` through every block and the head: logits (R, V)."""
        m, mods = self.model, self._step_mods(pos)
        x = x[:, 0]  # (R, D)
        for i, blk in enumerate(m.blocks):
            x = _decode_block(blk, x, mods[i], self.cache.layer(i), pos, *self.qk_norms[i], self.attention)
        a, c = mods[-1].chunk(2, dim=-1)
        h = torch.addcmul(c, F.layer_norm(x, (x.shape[-1],), eps=1e-6), a)  # the head's adaLN
        return m.lm_head(h).float()  # (R, V)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p; the rest -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def _resolve_order(order, model: RAR, device) -> torch.Tensor:
    from .orders import is_permutation, named_order

    if order is None:
        return torch.arange(model.config.num_tokens, device=device)
    if isinstance(order, str):
        order = named_order(order, model.config.grid_size)
    order = torch.as_tensor(order, device=device).long()
    if order.shape != (model.config.num_tokens,) or not is_permutation(order):
        raise ValueError(f"order must be a scan-order name or a permutation of 0..{model.config.num_tokens - 1}.")
    return order


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}.")
    bad = (labels < 0) | (labels > num_classes)
    if bad.any():
        raise ValueError(f"class id {int(labels[bad][0])} is outside [0, {num_classes}] "
                         f"({num_classes} = no class).")


@torch.inference_mode()
def generate(model: RAR, labels, *, guidance_scale: float | None = None, guidance_scale_pow: float | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, seed: int | None = None, indices=None,
             order=None, progress: bool = False, pack_weights: bool = True) -> torch.Tensor:
    """Sample image tokens (B, T) in raster layout for class `labels` (B,).

    Unset guidance_scale / guidance_scale_pow / temperature come from the model's preset. A guidance
    scale of 0 or 1 runs no unconditional rows. Randomness: `seed` (or one integer drawn from
    `generator`) and each sample's index (`indices`, default 0..B-1) fix its tokens, whatever the batch.
    `pack_weights` decodes on CPU with each linear weight in the layout fastest for the step's row
    count (faster; see `pack_for_cpu`, which also returns a model to pass here so that the
    preparation is done only once).
    """
    cfg = model.config
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device).long()
    _check_labels(labels, cfg.num_classes)
    g = cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
    p = cfg.guidance_scale_pow if guidance_scale_pow is None else float(guidance_scale_pow)
    temp = cfg.temperature if temperature is None else float(temperature)
    if temp <= 0:
        raise ValueError(f"temperature must be positive, got {temp}.")
    B, T = labels.shape[0], cfg.num_tokens
    order = _resolve_order(order, model, device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    indices = range(B) if indices is None else [int(i) for i in indices]
    uniforms = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                            for i in indices]).to(device)  # (B, T)
    guided = g not in (0.0, 1.0)
    scales = guidance_schedule(g, p, T).tolist()
    rows = torch.cat([labels, torch.full_like(labels, cfg.null_label)]) if guided else labels  # (R,)
    dec = CachedDecoder(pack_for_cpu(model) if pack_weights else model, rows, order)  # no-op if packed
    out = torch.empty(B, T, dtype=torch.long, device=device)
    logits = dec.prefill()  # (R, V)
    steps = range(T)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="tok", leave=False)
    for j in steps:
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + (cond - uncond) * scales[j]
        tok = _draw(logits / temp, top_k, top_p, uniforms[:, j])  # (B,)
        out[:, order[j]] = tok
        if j + 1 < T:
            logits = dec.step(tok.repeat(2) if guided else tok, j)
    return out


def _draw(logits: torch.Tensor, top_k: int | None, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with the row's own uniform u (B,)."""
    if top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits, top_k, top_p).softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return tok.clamp_max(logits.shape[-1] - 1)


@torch.inference_mode()
def cached_logits(model: RAR, tokens: torch.Tensor, labels: torch.Tensor, order=None) -> torch.Tensor:
    """Teacher-forced cached decoding: the (B, T, V) logits the sampler sees at each step when the
    given tokens are fed. Equals `model(tokens, labels, orders)` (tests hold the two together)."""
    order = _resolve_order(order, model, tokens.device)
    dec = CachedDecoder(model, labels, order)
    out = [dec.prefill()]
    for j in range(model.config.num_tokens - 1):
        out.append(dec.step(tokens[:, order[j]], j))
    return torch.stack(out, dim=1)  # (B, T, V)
