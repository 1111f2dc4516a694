"""Kept-first any-order decoding (`rar.edit`): per-row orders and the one-pass
prefill of known tokens against the full forward, kept tokens, reproducibility, edge cases."""
import pytest
import torch

from rar import RAR, RARConfig
from rar.model.orders import sample_orders
from rar.inference import cached_logits, generate, prepare
from rar.inference.editing import edit, kept_first_orders


def _random_case(model, B, seed, kept_counts):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.codebook_size, (B, cfg.num_tokens), generator=g)
    orders = sample_orders(B, cfg.num_tokens, 1.0, g)  # (B, T): a different permutation per row
    labels = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
    return tokens, orders, labels, torch.tensor(kept_counts)


@pytest.mark.parametrize("kept_counts", [[0, 0, 0, 0], [5, 5, 5, 5], [0, 3, 9, 15], [15, 1, 7, 7]])
def test_prefill_and_per_row_orders_equal_full_forward(tiny_official, kept_counts):
    tokens, orders, labels, kept = _random_case(tiny_official, 4, 1, kept_counts)
    full = tiny_official(tokens, labels, orders)  # (B, T, V)
    for backend in (tiny_official, prepare(tiny_official), prepare(tiny_official, attention_kernel=False)):
        cached = cached_logits(backend, tokens, labels, orders, kept=kept)
        assert (cached - full).abs().max() <= 1e-5


def test_prefill_equals_full_forward_on_a_wider_model():
    torch.manual_seed(0)
    model = RAR(RARConfig(64, 3, 4, 128, num_tokens=64, codebook_size=48, num_classes=7)).eval()
    for p in model.parameters():  # adaLN-zero init would hide the modulation: give it weights
        p.data.normal_(0, 0.05)
    tokens, orders, labels, kept = _random_case(model, 3, 2, [40, 0, 63])
    full = model(tokens, labels, orders)
    assert (cached_logits(prepare(model), tokens, labels, orders, kept=kept) - full).abs().max() <= 1e-5


def test_generate_takes_one_order_per_sample(tiny_official):
    cfg = tiny_official.config
    orders = sample_orders(3, cfg.num_tokens, 1.0, torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 4, cfg.num_classes])
    both = generate(tiny_official, labels, order=orders, seed=7, guidance_scale=3.0)
    for i in range(3):
        one = generate(tiny_official, labels[i:i + 1], order=orders[i], seed=7, indices=[i], guidance_scale=3.0)
        assert torch.equal(both[i:i + 1], one)


def _masks(T, B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) < torch.linspace(0.1, 0.9, B)[:, None]  # a different count per row


@pytest.mark.parametrize("kept_first", [True, False])
def test_kept_tokens_unchanged_and_samples_independent_of_the_batch(tiny_official, kept_first):
    cfg = tiny_official.config
    B = 5
    tokens = torch.randint(0, cfg.codebook_size, (B, cfg.num_tokens), generator=torch.Generator().manual_seed(4))
    keep = _masks(cfg.num_tokens, B, 5)
    labels = torch.tensor([0, 3, cfg.num_classes, 7, 7])
    kw = dict(seed=11, guidance_scale=4.0, kept_first=kept_first, temperature=1.0)
    out = edit(tiny_official, tokens, keep, labels, **kw)
    assert torch.equal(out[keep], tokens[keep])
    assert not torch.equal(out[~keep], tokens[~keep])  # something was generated
    for i in (0, 3):  # alone, and in a batch of two in the other order
        assert torch.equal(edit(tiny_official, tokens[i:i + 1], keep[i:i + 1], labels[i:i + 1], indices=[i], **kw),
                           out[i:i + 1])
    pair = edit(tiny_official, tokens[[4, 1]], keep[[4, 1]], labels[[4, 1]], indices=[4, 1], **kw)
    assert torch.equal(pair, out[[4, 1]])


def test_all_kept_returns_input_and_none_kept_equals_generate(tiny_official):
    cfg = tiny_official.config
    tokens = torch.randint(0, cfg.codebook_size, (3, cfg.num_tokens), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([2, 5, cfg.num_classes])
    keep = torch.ones_like(tokens, dtype=torch.bool)
    assert torch.equal(edit(tiny_official, tokens, keep, labels, seed=1), tokens)
    for order in (None, "spiral_in"):
        for kept_first in (True, False):
            for schedule_over in ("generated", "sequence"):
                got = edit(tiny_official, tokens, ~keep, labels, seed=3, order=order, kept_first=kept_first,
                           schedule_over=schedule_over)
                assert torch.equal(got, generate(tiny_official, labels, seed=3, order=order))
    mixed = keep.clone()
    mixed[1, ::2] = False  # row 0 and 2 all kept, row 1 half
    out = edit(tiny_official, tokens, mixed, labels, seed=1)
    assert torch.equal(out[[0, 2]], tokens[[0, 2]]) and torch.equal(out[mixed], tokens[mixed])


def test_kept_first_orders_is_a_stable_partition():
    orders = torch.tensor([[3, 0, 2, 1, 4], [0, 1, 2, 3, 4]])
    keep = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    assert kept_first_orders(orders, keep).tolist() == [[0, 2, 3, 1, 4], [3, 4, 0, 1, 2]]


def test_generated_tokens_see_known_tokens_after_them(tiny_official):
    """Kept-first: the first generated token's logits depend on a known token later in raster
    order; the raster baseline's cannot."""
    cfg = tiny_official.config
    tokens = torch.randint(0, cfg.codebook_size, (2, cfg.num_tokens), generator=torch.Generator().manual_seed(8))
    tokens[1, -1] = (tokens[0, -1] + 1) % cfg.codebook_size  # the rows differ only in the last token
    tokens[1, :-1] = tokens[0, :-1]
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False  # regenerate the first token only
    orders = kept_first_orders(torch.arange(cfg.num_tokens).expand(2, -1), keep)
    labels = torch.tensor([1, 1])
    logits = cached_logits(tiny_official, tokens, labels, orders, kept=keep.sum(1))
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-4  # order index T-1 is position 0


@pytest.mark.parametrize("change,message", [
    (dict(tokens=torch.zeros(2, 15, dtype=torch.long)), "tokens must be a non-empty (B, T) tensor with T = 16"),
    (dict(tokens=torch.zeros(0, 16, dtype=torch.long), keep=torch.zeros(0, 16, dtype=torch.bool),
          labels=torch.zeros(0, dtype=torch.long)), "tokens must be a non-empty"),
    (dict(tokens=torch.zeros(2, 16)), "tokens must be integer codes"),
    (dict(keep=torch.ones(2, 15, dtype=torch.bool)), "keep must be a bool tensor of the tokens' shape (2, 16)"),
    (dict(keep=torch.ones(2, 16, dtype=torch.long)), "keep must be a bool tensor"),
    (dict(tokens=torch.full((2, 16), 99)), "kept token 99 is outside the codebook"),
    (dict(labels=torch.tensor([1, 11])), "class id 11 is outside [0, 10]"),
    (dict(labels=torch.tensor([1, 2, 3])), "labels has 3 entries for 2 rows"),
    (dict(order=torch.zeros(16, dtype=torch.long)), "order must be a scan-order name or a permutation"),
    (dict(order=torch.arange(16).expand(3, 16)), "a per-sample order must have shape (B, T) = (2, 16)"),
    (dict(order="sideways"), "unknown order 'sideways'"),
    (dict(schedule_over="tokens"), "schedule_over must be one of"),
    (dict(temperature=-1.0), "temperature must be positive"),
])
def test_bad_edit_inputs_are_one_clear_error(tiny_official, change, message):
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, ::2] = True
    args = dict(tokens=torch.zeros(2, 16, dtype=torch.long), keep=keep, labels=torch.tensor([1, 2]))
    args.update(change)
    kw = {k: args.pop(k) for k in list(args) if k not in ("tokens", "keep", "labels")}
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        edit(tiny_official, args["tokens"], args["keep"], args["labels"], seed=0, **kw)
