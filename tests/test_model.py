"""The generator against the official implementation's outputs, and its structural guarantees."""
from unittest.mock import patch

import pytest
import torch

from rar import RAR, RARConfig, Regularization
from rar.model.weights import (load_generator, load_official_generator, official_parameter_count, official_shapes,
                            save_generator)
from rar.model.orders import sample_orders

from conftest import cloned_state, read_key_manifest, reference_labels


def test_train_logits_equal_official(rar_reference, tiny_official):
    ref = rar_reference
    labels = reference_labels(ref, tiny_official)
    assert labels[3].item() == tiny_official.config.num_classes  # row 3 is the "no class" row
    with torch.no_grad():
        logits = tiny_official(ref["input_ids"], labels, ref["orders"])
    assert logits.shape == (4, 16, 32)
    assert (logits - ref["train_logits"][:, :16]).abs().max().item() <= 1e-4


def test_raster_default_equals_explicit_raster(rar_reference, tiny_official):
    ref = rar_reference
    labels = reference_labels(ref, tiny_official)
    with torch.no_grad():
        a = tiny_official(ref["input_ids"][:1], labels[:1])
        b = tiny_official(ref["input_ids"][:1], labels[:1], ref["orders"][:1])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], ref["train_logits"][0, :16], rtol=0, atol=1e-4)


@pytest.mark.parametrize("k", [0, 5, 14])
def test_causal_under_any_order(tiny_official, k):
    g = torch.Generator().manual_seed(k)
    cfg = tiny_official.config
    tokens = torch.randint(0, cfg.codebook_size, (3, cfg.num_tokens), generator=g)
    labels = torch.tensor([0, 4, cfg.num_classes])
    orders = sample_orders(3, cfg.num_tokens, 1.0, g)
    changed = tokens.clone()
    rows = torch.arange(3)
    changed[rows, orders[:, k]] = (tokens[rows, orders[:, k]] + 1) % cfg.codebook_size
    with torch.no_grad():
        a, b = tiny_official(tokens, labels, orders), tiny_official(changed, labels, orders)
    torch.testing.assert_close(a[:, :k + 1], b[:, :k + 1], rtol=0, atol=0)
    assert (a[:, k + 1:] - b[:, k + 1:]).abs().max() > 1e-3  # later positions do see the change


def test_official_parameter_counts():
    expect = {"rar_b": 260_923_648, "rar_l": 461_668_352, "rar_xl": 955_425_024, "rar_xxl": 1_498_520_704}
    for name, n in expect.items():
        assert official_parameter_count(RARConfig.preset(name)) == n


def test_rar_b_manifest_matches_and_loads_on_meta():
    manifest = read_key_manifest("rar_b_keys.tsv")
    cfg = RARConfig.preset("rar_b")
    assert list(manifest) == list(official_shapes(cfg))  # same keys, same order
    assert manifest == official_shapes(cfg)
    sd = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    model = load_official_generator(sd)
    assert model.config == cfg  # sizes inferred (heads from qk-norm) and tuned sampling settings attached
    assert model.pos_embed.shape == (1, 258, 768)
    assert model.target_aware_pos_embed.shape == (1, 256, 768)
    assert model.timesteps_embeddings.shape == (1, 257, 768)


def test_missing_key_is_named(rar_reference):
    sd = cloned_state(rar_reference)
    del sd["blocks.1.attn.k_norm.bias"]
    with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.attn\.k_norm\.bias'"):
        load_official_generator(sd)


def test_unexpected_key_is_named(rar_reference):
    sd = cloned_state(rar_reference)
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.0\.attn\.extra' with shape \[3\]"):
        load_official_generator(sd)


def test_wrong_shape_is_named_with_both_shapes(rar_reference):
    sd = cloned_state(rar_reference)
    sd["blocks.1.mlp.fc2.bias"] = torch.zeros(65)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc2\.bias' has shape \[65\], expected \[64\]"):
        load_official_generator(sd)


def test_explicit_config_must_match(rar_reference):
    cfg = RARConfig(64, 2, 8, 256, num_tokens=16, codebook_size=32, num_classes=10)
    with pytest.raises(ValueError, match="num_heads is 4 in the checkpoint and 8 in the config"):
        load_official_generator(rar_reference["state_dict"], cfg)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_generator(tmp_path / "rar_b.bin")


def test_own_format_round_trip(tmp_path, rar_reference, tiny_official):
    save_generator(tiny_official, tmp_path / "gen")
    again = load_generator(tmp_path / "gen")
    assert again.config == tiny_official.config
    for (k, a), (k2, b) in zip(tiny_official.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(ValueError, match="num_layers is 2 in the checkpoint and 3"):
        load_generator(tmp_path / "gen", tiny_official.config.replace(num_layers=3))


def test_own_format_keeps_the_three_config_parts_and_reads_version_1_folders(tmp_path, tiny_official):
    """Folders record architecture, dropouts and sampling defaults apart; folders written before the
    split (version 1: one flat "config" with all of them) still load, with the same weights."""
    import json

    from rar import Regularization, SamplingDefaults

    model = RAR(tiny_official.config, Regularization(0.05, 0.0, 0.2), SamplingDefaults(2.5, 0.5, 0.9))
    model.load_state_dict(tiny_official.state_dict())
    save_generator(model, tmp_path / "gen", extra={"class_names": ["a"] * 10})
    again = load_generator(tmp_path / "gen")
    assert (again.config, again.regularization, again.sampling) == (model.config, model.regularization,
                                                                     model.sampling)
    meta = json.loads((tmp_path / "gen" / "config.json").read_text())
    flat = {**meta.pop("config"), **meta.pop("regularization"), **meta.pop("sampling")}
    (tmp_path / "gen" / "config.json").write_text(json.dumps({**meta, "version": 1, "config": flat}))
    old = load_generator(tmp_path / "gen")
    assert (old.config, old.regularization, old.sampling) == (model.config, model.regularization, model.sampling)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in model.state_dict().items())
    assert tiny_official.sampling == SamplingDefaults()  # no preset has the fixture's sizes: the defaults


def test_official_file_round_trip(tmp_path, rar_reference):
    path = tmp_path / "rar_tiny.bin"
    torch.save(rar_reference["state_dict"], path)
    model = load_generator(path)
    labels = reference_labels(rar_reference, model)
    with torch.no_grad():
        logits = model(rar_reference["input_ids"], labels, rar_reference["orders"])
    assert (logits - rar_reference["train_logits"][:, :16]).abs().max() <= 1e-4


def test_from_preset_keeps_the_preset_parts_when_sizes_change():
    from rar.model.config import PRESETS

    tiny = PRESETS["tiny"]
    model = RAR.from_preset("tiny", num_classes=100)
    assert model.config == tiny.config.replace(num_classes=100)
    assert (model.sampling, model.regularization) == (tiny.sampling, tiny.regularization)
    assert RAR(RARConfig.preset("tiny")).sampling == tiny.sampling  # an exact preset is recognised


def test_fresh_model_init_matches_official_rules():
    torch.manual_seed(0)
    model = RAR(RARConfig.preset("tiny"))
    assert torch.count_nonzero(model.cls_token) == 0
    for b in model.blocks:  # adaLN-zero
        assert torch.count_nonzero(b.adaLN_modulation[1].weight) == 0
    assert 0.015 < model.lm_head.weight.std().item() < 0.025
    assert torch.all(model.blocks[0].norm1.weight == 1)


def test_official_layout_round_trip(rar_reference, tiny_official):
    from rar.model.weights import to_official_state_dict

    sd = to_official_state_dict(tiny_official)
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(tiny_official.config)
    again = load_official_generator(sd)
    for k, v in tiny_official.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("attn_dropout", [0.3, 0.0])  # 0: the CPU attention kernel where nothing is recomputed
@pytest.mark.parametrize("mode", ["attention", "selective", "full"])
def test_recomputation_modes_give_the_same_gradients(monkeypatch, mode, attn_dropout):
    """Every `recompute` mode recomputes something in backward (memory); with the same seed the
    dropout masks, the loss and the gradients must equal a forward that keeps everything, and
    those of the other modes (which run other kernels: up to fp32 rounding)."""
    import torch.utils.checkpoint as ckpt

    cfg = RARConfig(32, 2, 2, 64, num_tokens=16, codebook_size=16, num_classes=3)
    torch.manual_seed(0)
    model = RAR(cfg, Regularization(dropout=0.1, attn_dropout=attn_dropout)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(0, 16, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    orders = sample_orders(4, 16, 1.0, torch.Generator().manual_seed(0))

    def loss_and_grads(mode=mode):
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(tokens, labels, orders, recompute=mode).logsumexp(-1).mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss, recomputed = loss_and_grads()
    other_loss, other_mode = loss_and_grads("full" if mode == "attention" else "attention")
    assert abs(loss - other_loss) < 1e-6
    for a, b in zip(recomputed, other_mode):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *args, **kw: fn(*args))  # keep every activation
    kept_loss, kept = loss_and_grads()
    assert loss == kept_loss
    for a, b in zip(recomputed, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(8)
    other = model(tokens, labels, orders).logsumexp(-1).mean()
    assert other.item() != loss  # dropout is active


def test_selective_recomputation_keeps_less():
    """`selective` keeps only the linear layers' outputs: the bytes still allocated after the forward."""
    from torch.profiler import profile

    cfg = RARConfig(64, 2, 4, 256, num_tokens=16, codebook_size=16, num_classes=3)
    model = RAR(cfg, Regularization(dropout=0.1, attn_dropout=0.1)).train()
    tokens, labels = torch.randint(0, 16, (4, 16)), torch.tensor([0, 1, 2, 3])

    def kept_bytes(mode):
        with profile(profile_memory=True) as prof:
            logits = model(tokens, labels, recompute=mode)  # noqa: F841 (keeps the graph alive)
        return sum(e.self_cpu_memory_usage for e in prof.key_averages())

    attention, selective, full = (kept_bytes(m) for m in ("attention", "selective", "full"))
    assert 0 < full < selective < 0.8 * attention  # attention keeps no masks on CPU (keys): ~0.7x


def test_keep_mask_rate_and_scale():
    from rar.model.dropout import drop_scale, dropout, keep_mask

    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.bool and abs(1 - keep.float().mean().item() - 0.1) < 2e-3
    assert keep_mask((3,), 0.0) is None and drop_scale(0.1) == 65536 / (65536 - 6554)
    x = torch.ones(1000, 1000)
    assert abs(dropout(x, keep, 0.1).mean().item() - 1) < 3e-3  # inverted dropout keeps the mean
    assert torch.equal(dropout(x, None, 0.1), x)


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 3 * 4096 + 17, 250_001])
def test_the_dropout_hash_kernel_equals_its_torch_definition_on_any_thread_count(n):
    """csrc/dropout_hash.c against `hash16` (the same counter-based hash in torch), for keys with high
    bits set, bool and float masks, 1 and 2 threads, lengths around its 4096-element chunks."""
    from rar.model.dropout import _LEVELS, hash16, hash_kernel

    kernel = hash_kernel()
    if kernel is None:
        pytest.skip("the dropout kernel cannot be built here")
    for key, level in (((0, 0), 6554), ((2**32 - 1, 12345), 1), ((0x9E3779B9, 2**31 + 7), 40000)):
        want = hash16(n, key) >= level
        for threads in (1, 2):
            keep, scales = torch.empty(n, dtype=torch.bool), torch.empty(n)
            kernel.dropout_keep(keep.data_ptr(), n, *key, level, threads)
            kernel.dropout_scales(scales.data_ptr(), n, *key, level, 1.25, threads)
            assert torch.equal(keep, want) and torch.equal(scales, want * 1.25)
    if n > 200_000:  # the 16-bit values are uniform: each of 16 bins holds 1/16 of the draws
        bins = torch.bincount(hash16(n, (7, 9)) // (_LEVELS // 16), minlength=16).float() / n
        assert (bins - 1 / 16).abs().max() < 3e-3


def test_cpu_masks_come_from_the_global_generator_and_agree_between_bool_and_float():
    """keep_mask and scale_mask draw their keys from the global generator (fixed seed: fixed mask)
    and give the same draws as a keep-mask and as multipliers; without the kernel they fall back to
    16-bit draws of torch's generator, at the same rate."""
    from rar.model import dropout as d

    torch.manual_seed(3)
    keep = d.keep_mask((64, 65, 40), 0.1)
    torch.manual_seed(3)
    scales = d.scale_mask((64, 65, 40), 0.1)
    torch.manual_seed(3)
    again = d.keep_mask((64, 65, 40), 0.1)
    assert torch.equal(keep, again) and torch.equal(scales, keep * d.drop_scale(0.1))
    assert not torch.equal(keep, d.keep_mask((64, 65, 40), 0.1))  # the next draw has a new key
    with patch.object(d, "hash_kernel", lambda: None):
        torch.manual_seed(3)
        fallback = d.scale_mask((1000, 1000), 0.1)
    assert abs((fallback == 0).float().mean().item() - 0.1) < 2e-3


def test_gradients_are_bit_identical_run_to_run_on_two_threads():
    """The backward pass of the position tables sums repeated rows in a fixed order (index_select,
    not advanced indexing, whose accumulation order varies between CPU threads): two identical
    steps give identical gradients, so fixed-seed training is reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = RARConfig.preset("tiny")
        torch.manual_seed(0)
        model = RAR(cfg, Regularization(0.1, 0.0, 0.1)).train()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.codebook_size, (64, cfg.num_tokens), generator=g)
        labels = torch.randint(0, cfg.num_classes, (64,), generator=g)
        orders = sample_orders(64, cfg.num_tokens, 1.0, g)

        def grads():
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            model(tokens, labels, orders, recompute="attention").logsumexp(-1).mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        first = grads()
        differ = set()
        for _ in range(4):
            again = grads()
            differ |= {n for n in first if not torch.equal(first[n], again[n])}
    finally:
        torch.set_num_threads(threads)
    assert differ == set()
