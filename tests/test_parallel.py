"""Parallel decoding (#26): the one cached step against the full forward, groups and schedules,
S = T as today's decoding, caches untouched by queries, reproducibility, editing, bad input."""
import pytest
import torch

from rar import RAR
from rar.decode.cache import CachedDecoder
from rar.inference import edit, generate, prepare
from rar.inference.parallel import GROUP_SCHEDULES, group_sizes, wavefront_order, wavefront_times

TOL = 1e-5


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = RAR.from_preset("tiny").eval()
    with torch.no_grad():  # every adaLN active, logits well spread
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _swap(order: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """(B, T) orders with indices n and n + i exchanged: the order that asks for o[n + i] at n."""
    o = order.clone()
    o[:, [n, n + i]] = o[:, [n + i, n]]
    return o


def _random_groups(total: int, g: torch.Generator) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(1, 6, (1,), generator=g)), total - sum(sizes)))
    return sizes


def _check_passes(model, backend, tokens, labels, orders, kept: int, seed: int):
    """Run random groups through `CachedDecoder` and compare every output row with the full forward
    of the order that puts that row's target next."""
    B, T = tokens.shape
    g = torch.Generator().manual_seed(seed)
    sizes = _random_groups(T - kept, g)
    full = lambda o: model(tokens, labels, o)  # noqa: E731  (B, T, V)
    dec = CachedDecoder(backend, labels, orders, torch.full((B,), kept))
    first = orders[:, kept + 1:kept + sizes[0]]
    out = dec.prefill(tokens, targets=first if first.shape[1] else None)
    out = out if out.ndim == 3 else out[:, None]
    j = 0
    for s, size in enumerate(sizes):
        n = kept + j
        for i in range(size):
            want = full(_swap(orders, n, i))[:, n]
            assert (out[:, i] - want).abs().max() < TOL, (s, i)
        if s + 1 < len(sizes):
            nxt = orders[:, n + size + 1:n + size + sizes[s + 1]]
            out = dec.extend(tokens.gather(1, orders[:, n:n + size]), j, nxt if nxt.shape[1] else None)
        j += size


@pytest.mark.parametrize("kept", [0, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_cached_step_equals_full_forward_for_random_groups_and_orders(kept, packed):
    model = _tiny()
    T, V = model.config.num_tokens, model.config.codebook_size
    g = torch.Generator().manual_seed(kept)
    tokens = torch.randint(0, V, (3, T), generator=g)
    labels = torch.tensor([0, 3, model.config.num_classes])  # the null label too
    orders = torch.stack([torch.randperm(T, generator=g) for _ in range(3)])
    with torch.no_grad():
        _check_passes(model, prepare(model, packed=packed), tokens, labels, orders, kept, seed=kept + packed)


def test_cached_step_equals_full_forward_on_the_official_fixture(tiny_official):
    T, V = tiny_official.config.num_tokens, tiny_official.config.codebook_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2, T), generator=g)
    labels = torch.tensor([1, 2])
    orders = torch.stack([torch.randperm(T, generator=g), torch.arange(T)])
    with torch.no_grad():
        _check_passes(tiny_official, prepare(tiny_official), tokens, labels, orders, 0, seed=3)


def test_prefill_with_queries_and_mixed_kept_counts_equals_full_forward():
    """Rows with different numbers of known tokens (padding slots) and queries in the prefill."""
    model = _tiny(1)
    T, V = model.config.num_tokens, model.config.codebook_size
    tokens = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))
    labels, orders = torch.tensor([1, 2, 3]), torch.stack([torch.randperm(T) for _ in range(3)])
    kept = torch.tensor([0, 4, 9])
    dec = CachedDecoder(prepare(model), labels, orders, kept)
    targets = torch.stack([orders[b, kept[b] + 1:kept[b] + 4] for b in range(3)])  # (B, 3)
    with torch.no_grad():
        out = dec.prefill(tokens, targets=targets)  # (B, 4, V)
        for b in range(3):
            n = int(kept[b])
            for i in range(4):
                want = model(tokens[b:b + 1], labels[b:b + 1], _swap(orders[b:b + 1], n, i))[0, n]
                assert (out[b, i] - want).abs().max() < TOL


@pytest.mark.parametrize("packed", [False, True])
def test_queries_never_change_the_cache(packed):
    """A pass with and without query rows leaves the same keys and values in the filled slots (the
    queries only borrow the free slots after them), and the next pass gives the same logits."""
    model = _tiny()
    backend = prepare(model, packed=packed)
    T = model.config.num_tokens
    labels, orders = torch.tensor([2, 5]), torch.stack([torch.randperm(T), torch.randperm(T)])
    tok = torch.randint(0, model.config.codebook_size, (2, 4))
    caches = []
    for queries in (None, orders[:, 6:10]):
        dec = CachedDecoder(backend, labels, orders)
        dec.cache.keys.fill_(float("nan"))
        dec.cache.values.fill_(float("nan"))
        with torch.no_grad():
            dec.prefill()
            dec.extend(tok, 0, queries)
        kv = torch.stack([dec.cache.keys, dec.cache.values])  # (2, layers, R, H, S, Dh)
        assert kv[..., :6, :].isfinite().all() and kv[..., 6 + (0 if queries is None else 4):, :].isnan().all()
        with torch.no_grad():
            nxt = dec.extend(tok[:, :2], 4, orders[:, 8:9])
        caches.append((kv[..., :6, :], nxt))
    # equal up to the rounding of a matmul over more rows (the kernels block rows differently)
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", GROUP_SCHEDULES)
def test_group_sizes_sum_to_the_tokens_and_follow_the_schedule(schedule):
    for total, steps in [(256, 256), (256, 64), (256, 8), (64, 16), (10, 30), (1, 1)]:
        sizes = group_sizes(total, steps, schedule)
        assert sum(sizes) == total and len(sizes) == min(steps, total) and min(sizes) >= 1
    sizes = group_sizes(256, 16, schedule)
    if schedule == "constant":
        assert max(sizes) - min(sizes) <= 1
    else:  # first groups small, later ones larger
        assert sizes[0] < sizes[-1] and sizes[0] <= 256 / 16


@pytest.mark.parametrize("steps", [256, 128, 64, 32, 31, 20, 16, 5, 1])
def test_wavefront_takes_the_steps_and_keeps_raster_neighbours_earlier(steps):
    t = wavefront_times(16, steps)
    assert int(t.max()) + 1 == steps and t.min() == 0
    grid = t.view(16, 16)
    assert (grid[:, 1:] >= grid[:, :-1]).all() and (grid[1:] >= grid[:-1]).all()  # left and above never later
    if steps >= 31:  # strictly earlier: each pass predicts positions whose left and upper neighbours are known
        assert (grid[:, 1:] > grid[:, :-1]).all() and (grid[1:] > grid[:-1]).all()
    assert torch.equal(wavefront_order(16, 256), torch.arange(256))  # T passes: raster


def test_steps_equal_tokens_is_todays_decoding(tiny_official):
    labels = torch.tensor([0, 1, 2])
    T = tiny_official.config.num_tokens
    a = generate(tiny_official, labels, seed=4)
    assert torch.equal(a, generate(tiny_official, labels, seed=4, steps=T, schedule="arccos"))
    assert torch.equal(generate(tiny_official, labels, seed=4, order="wavefront", steps=T), a)  # wavefront at T = raster


@pytest.mark.parametrize("order", [None, "random", "wavefront", "spiral_in"])
def test_parallel_samples_do_not_depend_on_the_batch(order):
    model = _tiny()
    backend = prepare(model)
    T = model.config.num_tokens
    labels = torch.tensor([1, 4, 7, 2])
    for steps in (T // 4, 7):
        whole = generate(backend, labels, seed=3, steps=steps, order=order)
        part = generate(backend, labels[2:], seed=3, steps=steps, order=order, indices=[2, 3])
        assert torch.equal(whole[2:], part)
        assert not torch.equal(whole, generate(backend, labels, seed=4, steps=steps, order=order))


def test_greedy_parallel_equals_the_group_by_group_argmax():
    """Greedy S < T: each group's tokens are the argmax of the full forward that asks for them."""
    model = _tiny(2)
    T = model.config.num_tokens
    labels = torch.tensor([3])
    steps = 9
    tokens = generate(model, labels, seed=0, steps=steps, top_k=1, guidance_scale=1.0)
    sizes, done = group_sizes(T, steps, "cosine"), 0
    with torch.no_grad():
        for size in sizes:
            for i in range(size):
                order = _swap(torch.arange(T)[None], done, i)
                pred = model(tokens, labels, order)[0, done].argmax()
                assert pred == tokens[0, done + i]
            done += size


@pytest.mark.parametrize("kept_first", [True, False])
def test_parallel_editing_keeps_kept_tokens(kept_first):
    model = _tiny()
    backend = prepare(model)
    T = model.config.num_tokens
    tokens = generate(backend, torch.tensor([1, 2, 3]), seed=0)
    keep = torch.zeros(3, T, dtype=torch.bool)
    keep[0, :T // 2], keep[1, ::3], keep[2, :5] = True, True, True
    out = edit(backend, tokens, keep, torch.tensor([1, 2, 3]), seed=1, steps=T // 4, kept_first=kept_first)
    assert torch.equal(out[keep], tokens[keep])
    alone = edit(backend, tokens[1:2], keep[1:2], torch.tensor([2]), seed=1, steps=T // 4, kept_first=kept_first,
                 indices=[1])
    assert torch.equal(out[1:2], alone)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(steps=0), "steps"), (dict(steps=65), "[1, 64]"), (dict(steps=2.5), "steps"), (dict(steps=True), "steps"),
    (dict(steps=8, schedule="zigzag"), "schedule must be one of"),
    (dict(steps=8, order=[0] * 64), "permutation"),
])
def test_bad_parallel_arguments_are_one_clear_error(kwargs, phrase):
    model = _tiny()
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        generate(model, torch.tensor([1]), seed=0, **kwargs)


def test_cli_sample_sample_eval_and_inpaint_take_steps(tmp_path, capsys):
    """`--steps/--schedule/--order` reach the decoder from each command; sample-eval records them
    (and files of one-pass-per-token decoding record neither)."""
    import json

    import numpy as np
    from PIL import Image

    from conftest import save_tiny_pair
    from rar.apps.cli import main
    from rar.apps.sample_npz import read_settings
    from rar.model.weights import load_generator

    gen = save_tiny_pair(tmp_path / "gen", tmp_path / "tok", perturb=0.05)
    common = ["--generator", str(tmp_path / "gen"), "--seed", "2"]
    assert main(["sample", *common, "--classes", "1,2", "--num-per-class", "2", "--out", str(tmp_path / "s"),
                 "--steps", "8", "--schedule", "arccos", "--order", "random"]) == 0
    want = generate(load_generator(tmp_path / "gen"), torch.tensor([1, 1, 2, 2]), seed=2, steps=8, schedule="arccos",
                    order="random")
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "s" / "tokens.npy")), want)
    assert not torch.equal(want, generate(gen, torch.tensor([1, 1, 2, 2]), seed=2))

    ev = ["sample-eval", *common, "--tokenizer", str(tmp_path / "tok"), "--num-classes", "2", "--num-per-class", "2"]
    assert main([*ev, "--out", str(tmp_path / "p.npz"), "--steps", "16", "--order", "wavefront"]) == 0
    recorded = read_settings(tmp_path / "p.npz")
    recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
    assert recorded["steps"] == 16 and recorded["schedule"] is None and recorded["order"] == "wavefront"
    assert main([*ev, "--out", str(tmp_path / "q.npz")]) == 0
    assert "steps" not in (lambda r: json.loads(r) if isinstance(r, str) else r)(read_settings(tmp_path / "q.npz"))

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "x.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main(["inpaint", str(tmp_path / "x.png"), *common, "--tokenizer", str(tmp_path / "tok"), "--mask",
                 str(tmp_path / "m.png"), "--num", "2", "--out", str(tmp_path / "ip"), "--steps", "4"]) == 0
    assert len(list((tmp_path / "ip").glob("*.png"))) >= 2
    capsys.readouterr()
    for bad, phrase in ((["--steps", "0"], "steps"), (["--steps", "65"], "[1, 64]"), (["--schedule", "x"], "schedule")):
        assert main(["sample", *common, "--out", str(tmp_path / "bad"), *bad]) == 2
        assert phrase in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()  # refused before any output


def test_rows_attention_kernel_torch_and_no_room_paths_agree():
    """The multi-query kernel, torch's attention with the mask, and the copy used where the cache
    has no free slots after the chain give the same outputs; the kept slots hold the chain."""
    from rar.decode.backend import single_query_attention
    from rar.decode.step import PassRows, _rows_attention

    model = _tiny()
    kernel = prepare(model).attention
    if not hasattr(kernel, "multi"):
        pytest.skip("no compiled attention kernel here")
    g = torch.Generator().manual_seed(0)
    R, H, Dh, slot, chain, queries = 3, model.config.num_heads, model.config.head_dim, 7, 3, 4
    N = chain + queries
    q, k, v = (torch.randn(R, N, H, Dh, generator=g) for _ in range(3))
    cache = torch.randn(2, R, H, slot + N, Dh, generator=g)
    rows = PassRows(slot, chain, queries)
    outs = []
    for attention, size in ((kernel, slot + N), (single_query_attention, slot + N), (single_query_attention, slot + chain)):
        kv = cache[:, :, :, :size].clone()
        outs.append(_rows_attention(q, k, v, (kv[0], kv[1]), rows, attention, N - 1))
        assert torch.equal(kv[0][:, :, slot:slot + chain], k[:, :chain].transpose(1, 2))
        assert torch.equal(kv[0][:, :, :slot], cache[0, :, :, :slot])  # the filled slots untouched
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=1e-6)
