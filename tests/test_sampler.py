"""The sampler against the official sampler's outputs, the cached path against the full forward,
and reproducibility independent of batching."""
import pytest
import torch

from rar import RAR, RARConfig
from rar.model.orders import named_order, sample_orders
from rar.inference import cached_logits, filter_logits, generate, guidance_schedule, prepare


SETTINGS = {"g16.0_pow2.75": (16.0, 2.75), "g4.0_pow0.0": (4.0, 0.0)}


@pytest.mark.parametrize("key", sorted(["g16.0_pow2.75", "g4.0_pow0.0", "g16.0_pow2.75_L256", "g4.0_pow0.0_L256"]))
def test_guidance_schedule_equals_upstream(rar_reference, key):
    g, p = SETTINGS[key.removesuffix("_L256")]
    T = 256 if key.endswith("_L256") else 16
    torch.testing.assert_close(guidance_schedule(g, p, T), rar_reference["cfg_scales"][key], rtol=0, atol=0)


@pytest.mark.parametrize("key,g,p", [("g16.0_pow2.75", 16.0, 2.75), ("g4.0_pow0.0", 4.0, 0.0),
                                     ("nocfg", 0.0, 0.0), ("nocfg", 1.0, 2.75)])
def test_greedy_decoding_reproduces_official(rar_reference, tiny_official, key, g, p):
    tokens = generate(tiny_official, rar_reference["greedy_labels"], guidance_scale=g, guidance_scale_pow=p, top_k=1)
    assert torch.equal(tokens, rar_reference["greedy_tokens"][key])
    one = generate(tiny_official, rar_reference["greedy_labels"][:1], guidance_scale=g, guidance_scale_pow=p, top_k=1)
    assert torch.equal(one, tokens[:1])  # batch 1: the 1-2 row kernels (`DecodeLinear`), same tokens


def test_cached_steps_equal_official_kv_path(rar_reference, tiny_official):
    ref = rar_reference
    labels = ref["kv_condition"] - tiny_official.config.codebook_size - 1  # [c0, c1, none, none]
    tokens = torch.cat([ref["kv_tokens"], ref["kv_tokens"]])
    logits = cached_logits(tiny_official, tokens, labels)  # (4, L, V)
    torch.testing.assert_close(logits.transpose(0, 1), ref["kv_step_logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("order", [None, "spiral_in", "z_curve", "random"])
def test_cached_equals_full_forward_every_step(tiny_official, order):
    cfg = tiny_official.config
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.codebook_size, (3, cfg.num_tokens), generator=g)
    tokens = torch.cat([tokens, tokens])  # conditional and "no class" halves, as with guidance
    labels = torch.tensor([0, 3, 9] + [cfg.num_classes] * 3)
    if order == "random":
        order = sample_orders(1, cfg.num_tokens, 1.0, g)[0]
    o = torch.arange(cfg.num_tokens) if order is None else (
        named_order(order, cfg.grid_size) if isinstance(order, str) else order)
    with torch.no_grad():
        full = tiny_official(tokens, labels, o.expand(6, -1))
    cached = cached_logits(tiny_official, tokens, labels, order)
    assert (cached - full).abs().max() <= 1e-5


@pytest.mark.parametrize("min_rows,window", [(1, 1), (10, 5)])
def test_modulation_window_boundaries_do_not_change_logits(tiny_official, monkeypatch, min_rows, window):
    import rar.decode.cache as decoder
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 10])
    whole = cached_logits(tiny_official, tokens, labels)
    monkeypatch.setattr(decoder, "MOD_BUDGET_BYTES", 1)  # the window is then min_rows / 2 labels
    monkeypatch.setattr(decoder, "MIN_WINDOW_ROWS", min_rows)
    assert decoder.CachedDecoder(prepare(tiny_official), labels, torch.arange(16)).window == window
    torch.testing.assert_close(cached_logits(tiny_official, tokens, labels), whole, rtol=0, atol=1e-5)


def test_same_tokens_whatever_the_batching(tiny_official):
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    kw = dict(guidance_scale=4.0, guidance_scale_pow=1.0, temperature=1.0, seed=123)
    whole = generate(tiny_official, labels, **kw)
    parts = [generate(tiny_official, labels[:2], indices=[0, 1], **kw),
             generate(tiny_official, labels[2:3], indices=[2], **kw),
             generate(tiny_official, labels[3:], indices=[3, 4, 5], **kw)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(generate(tiny_official, labels, **{**kw, "seed": 124}), whole)
    # a generator yields a seed: same generator state, same tokens
    a = generate(tiny_official, labels, generator=torch.Generator().manual_seed(9))
    b = generate(tiny_official, labels, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("extra", [{}, {"order": "random", "steps": 4}])
def test_one_seed_per_sample_gives_each_its_lone_tokens(tiny_official, extra):
    """Requests of several users in one batch (the app under load): row b with seed s_b and index
    i_b gets exactly the tokens of a lone call with seed s_b (orders and draws alike)."""
    kw = dict(guidance_scale=4.0, guidance_scale_pow=1.0, temperature=1.0, **extra)
    lone = [generate(tiny_official, torch.tensor([3, 3]), seed=7, **kw), generate(tiny_official, torch.tensor([5]), seed=8, **kw)]
    together = generate(tiny_official, torch.tensor([3, 3, 5]), seed=[7, 7, 8], indices=[0, 1, 0], **kw)
    assert torch.equal(together, torch.cat(lone))
    for bad, message in (([7, 8], "2 values for 3 samples"), ([7, -1, 8], "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            generate(tiny_official, torch.tensor([3, 3, 5]), seed=bad, **kw)


def test_named_order_greedy_is_consistent_and_raster_layout(tiny_official):
    labels = torch.tensor([2, 7])
    order = named_order("spiral_out", tiny_official.config.grid_size)
    tokens = generate(tiny_official, labels, guidance_scale=0.0, top_k=1, order="spiral_out")
    with torch.no_grad():
        logits = tiny_official(tokens, labels, order.expand(2, -1))
    # each token (in raster layout) is the argmax predicted at its step of the spiral order
    assert torch.equal(logits.argmax(-1), tokens[:, order])
    raster = generate(tiny_official, labels, guidance_scale=0.0, top_k=1)
    assert not torch.equal(raster, tokens)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = torch.isfinite(filter_logits(logits, 2, None))
    assert keep.tolist() == [[True, True, False, False]]
    keep = torch.isfinite(filter_logits(logits, None, 0.75))
    assert keep.tolist() == [[True, True, False, False]]
    keep = torch.isfinite(filter_logits(logits, None, 0.85))
    assert keep.tolist() == [[True, True, True, False]]
    keep = torch.isfinite(filter_logits(logits, None, 0.1))  # never empty
    assert keep.tolist() == [[True, False, False, False]]


def test_sampling_follows_the_distribution():
    # a model whose output ignores the input: the head bias alone sets the distribution
    torch.manual_seed(0)
    model = RAR(RARConfig(32, 1, 2, 64, num_tokens=4, codebook_size=4, num_classes=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    tokens = generate(model, torch.zeros(2000, dtype=torch.long), guidance_scale=1.0, temperature=1.0, seed=0)
    freq = torch.bincount(tokens.flatten(), minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)
    only_top = generate(model, torch.zeros(50, dtype=torch.long), guidance_scale=1.0, top_p=0.35, seed=0)
    assert (only_top == 3).all()


def test_bad_labels_are_rejected(tiny_official):
    with pytest.raises(ValueError, match="class id 11 is outside"):
        generate(tiny_official, torch.tensor([1, 11]))


def test_prepared_backend_gives_the_same_logits_and_leaves_the_model_alone(tiny_official):
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 10, 10])
    before = {k: v.clone() for k, v in tiny_official.state_dict().items()}
    backend = prepare(tiny_official)
    assert backend.model is tiny_official and backend.packed and "attention:" in backend.description
    assert type(tiny_official.blocks[0].attn.qkv) is torch.nn.Linear  # the model is not patched
    assert not hasattr(tiny_official, "folded_adaln") and tiny_official.config == backend.config
    torch.testing.assert_close(cached_logits(backend, tokens, labels), cached_logits(tiny_official, tokens, labels),
                               rtol=0, atol=1e-5)
    greedy = generate(tiny_official, torch.tensor([0, 5, 9]), guidance_scale=4.0, guidance_scale_pow=0.0, top_k=1,
                      pack_weights=False)
    assert torch.equal(greedy, generate(backend, torch.tensor([0, 5, 9]), guidance_scale=4.0,
                                        guidance_scale_pow=0.0, top_k=1))
    assert all(torch.equal(v, before[k]) for k, v in tiny_official.state_dict().items())
    converted = prepare(tiny_official, dtype=torch.float64, packed=False)  # a converted copy
    assert converted.dtype == torch.float64 and next(tiny_official.parameters()).dtype == torch.float32


def test_folded_adaln_equals_modulate_of_the_norms(tiny_official):
    """The decode step's folded adaLN gives x_hat * a + c == modulate(norm(x), shift, scale)."""
    import torch.nn.functional as F
    from rar.model.transformer import modulate
    from rar.inference import fold_adaln

    m, D = tiny_official, tiny_official.config.hidden_size
    cond = m.condition(torch.tensor([0, 5, m.config.num_classes]))  # (3, T+1, D)
    x = torch.randn(3, cond.shape[1], D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folded = fold_adaln(m)(F.silu(cond)).split(6 * D, dim=-1)
        raw = m.modulations(cond)
        for blk, mod, fold in zip(m.blocks, raw, folded):
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            a1, c1, g1, a2, c2, g2 = fold.chunk(6, dim=-1)
            x_hat = F.layer_norm(x, (D,), eps=1e-6)
            torch.testing.assert_close(torch.addcmul(c1, x_hat, a1), modulate(blk.norm1(x), shift1, scale1))
            torch.testing.assert_close(torch.addcmul(c2, x_hat, a2), modulate(blk.norm2(x), shift2, scale2))
            torch.testing.assert_close((g1, g2), (gate1, gate2))
        a, c = folded[-1].chunk(2, dim=-1)
        torch.testing.assert_close(torch.addcmul(c, F.layer_norm(x, (D,), eps=1e-6), a), m.adaln_before_head(x, raw[-1]))


def test_rows_builds_only_the_layouts_of_that_row_count(tiny_official):
    from rar.decode.cpu.linear import DecodeLinear

    labels = torch.tensor([3, 4])
    backend = prepare(tiny_official)
    assert torch.equal(generate(backend, labels, top_k=1), generate(tiny_official, labels, top_k=1, pack_weights=False))
    ready = prepare(tiny_official, rows=2)  # layouts for 2-row steps built now, the others never
    lins = [lin for b in ready.blocks for lin in (b.qkv, b.proj, b.fc1, b.fc2)]
    assert all(isinstance(m, DecodeLinear) for m in lins)
    assert all(m.layouts() == {m.kernel(2)} for m in lins)
    assert ready.head.layouts() == {ready.head.kernel(2)}  # the head too: it runs every step


@pytest.mark.parametrize("kernel,dtype", [("gemv", torch.float32), ("onednn", torch.float32), ("aten", torch.float32),
                                          ("few_rows", torch.float32), ("onednn", torch.bfloat16),
                                          ("aten", torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 24])
def test_decode_linear_equals_linear_for_every_kernel(rows, dtype, kernel, monkeypatch):
    """Each kernel `DecodeLinear` can pick, forced, equals F.linear, from contiguous and strided inputs;
    gemv here has 3 column blocks, the last narrower; few_rows a last panel and a last k chunk that
    are partly filled. oneDNN's bf16 kernel needs AVX512-BW/VL/DQ or AVX-NE-CONVERT, and few_rows
    AVX2 and a C compiler: where they are missing that case is skipped (the fallbacks are tested
    below)."""
    from rar.decode.cpu import linear_kernel
    from rar.decode.cpu.capability import GEMV_K_CHUNK, CPUCapability
    from rar.decode.cpu.linear import DecodeLinear

    cap = CPUCapability.detect()
    if kernel == "onednn" and not (cap.onednn and (dtype == torch.float32 or cap.onednn_bf16)):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU ({cap.describe()})")
    few_rows = linear_kernel.load(CPUCapability.detect().compiler_flags()) if kernel == "few_rows" else None
    if kernel == "few_rows" and few_rows is None:
        pytest.skip(f"no rar.linear_kernel here: {linear_kernel.unavailable_reason(CPUCapability.detect().compiler_flags())}")
    monkeypatch.setattr(CPUCapability, "kernel", lambda self, dt, r, compiled=False: kernel)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(2 * GEMV_K_CHUNK + 100, 29)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    lin = lin.to(dtype)
    dec = DecodeLinear(lin, cap, few_rows=few_rows)
    x = torch.randn(lin.in_features, rows, generator=g).to(dtype).t()  # a transposed (strided) input
    for inp in (x, x.contiguous()[:, None]):
        out = dec(inp)
        assert out.shape == (*inp.shape[:-1], 29) and out.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
        torch.testing.assert_close(out, lin(inp).detach(), **tol)
    assert dec.layouts() == ({kernel} - {"aten"})


def test_kernel_choice_follows_the_cpu_capability():
    from rar.decode.cpu.capability import CPUCapability

    avx512 = CPUCapability("AVX512", onednn=True, onednn_bf16=True)
    avx2 = CPUCapability("AVX2", onednn=True, onednn_bf16=False)
    bare = CPUCapability("DEFAULT", onednn=False, onednn_bf16=False, machine="aarch64")
    assert [avx512.kernel(torch.float32, r) for r in (1, 2, 3, 16)] == ["onednn", "gemv", "onednn", "onednn"]
    # with rar.linear_kernel loaded: every few-row count on AVX2, the counts it wins on AVX-512
    assert [avx2.kernel(torch.float32, r, compiled=True) for r in (1, 2, 7, 16, 48, 49)] == ["few_rows"] * 5 + ["onednn"]
    assert [avx512.kernel(torch.float32, r, compiled=True) for r in (2, 4, 16, 32)] == ["few_rows", "onednn",
                                                                                       "few_rows", "onednn"]
    assert avx2.kernel(torch.bfloat16, 16, compiled=True) == "aten"  # the compiled kernel is fp32 only
    assert [avx512.kernel(torch.bfloat16, r) for r in (1, 2, 16)] == ["onednn"] * 3
    assert avx2.compute_dtype(torch.bfloat16) == torch.float32 and avx512.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert [bare.kernel(torch.float32, r) for r in (1, 2, 16)] == ["aten", "gemv", "aten"]
    assert "-mavx512f" in avx512.compiler_flags() and "-mfma" in avx2.compiler_flags()
    assert not any("avx512" in f for f in avx2.compiler_flags())
    assert bare.compiler_flags() == [] and CPUCapability("DEFAULT", False, False).compiler_flags() == []


@pytest.mark.parametrize("capability", ["AVX2 without oneDNN bf16", "no oneDNN at all"])
def test_forced_fallbacks_decode_like_the_reference(tiny_official, rar_reference, capability):
    """What an AVX2-only CPU (or a torch without oneDNN) runs, forced on any host: a bf16 model is
    decoded in fp32 and says so; every path reproduces the official greedy tokens in fp32."""
    import copy

    from rar.decode.cpu.capability import CPUCapability

    cap = (CPUCapability("AVX2", onednn=True, onednn_bf16=False) if capability.startswith("AVX2")
           else CPUCapability("DEFAULT", onednn=False, onednn_bf16=False))
    labels = rar_reference["greedy_labels"]
    backend = prepare(tiny_official, capability=cap)
    tokens = generate(backend, labels, guidance_scale=16.0, guidance_scale_pow=2.75, top_k=1)
    assert torch.equal(tokens, rar_reference["greedy_tokens"]["g16.0_pow2.75"])
    bf16 = copy.deepcopy(tiny_official).to(torch.bfloat16)
    fallback = prepare(bf16, capability=cap)
    assert fallback.dtype == torch.float32 and "bfloat16 weights decoded in float32" in fallback.description
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the caller's model is not converted
    exact = prepare(copy.deepcopy(bf16).float(), capability=cap)  # the same bf16 values, in fp32
    assert torch.equal(generate(fallback, labels, top_k=1), generate(exact, labels, top_k=1))


def test_bf16_single_query_attention_is_close_to_fp32(monkeypatch):
    """bf16 decoding on CPU uses two matmuls around an fp32 softmax instead of the fused kernel;
    its error against fp32 stays within 2.5x the fused bf16 kernel's (RAR's head size, q/k-normed)."""
    import torch.nn.functional as F
    from rar.decode.backend import single_query_attention as _single_query_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 64, generator=g) for n in (1, 37, 37))
    q, k = (F.layer_norm(t, (64,)) for t in (q, k))
    ref = F.scaled_dot_product_attention(q, k, v).view(3, 4 * 64)
    assert torch.equal(_single_query_attention(q[:, :, 0], k, v), ref)  # fp32: the fused kernel itself
    low = [t.bfloat16() for t in (q[:, :, 0], k, v)]
    fused_err = (F.scaled_dot_product_attention(low[0][:, :, None], *low[1:]).float().view(3, -1) - ref).abs().max()

    def refuse(*args, **kwargs):
        raise AssertionError("bf16 must not take the fused kernel")
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    ours = _single_query_attention(*low)
    assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape
    assert (ours.float() - ref).abs().max() <= 2.5 * fused_err


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused_not_truncated(tiny_official, seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        generate(tiny_official, torch.tensor([1]), seed=seed)
