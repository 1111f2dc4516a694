"""MaskGIT-VQGAN: equality with the official code (fixture), official-checkpoint loading, project format."""
import time

import pytest
import torch

from rar.tokenizer.vqgan import (VQGAN, VQGANConfig, infer_config, load_any_tokenizer, load_official_tokenizer,
                       load_tokenizer, save_tokenizer)

from conftest import cloned_state, read_key_manifest


@pytest.fixture(scope="module")
def tiny(vqgan_reference):
    return load_official_tokenizer(vqgan_reference["state_dict"])


def test_fixture_equality(vqgan_reference, tiny):
    cfg = tiny.config
    assert (cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.z_channels, cfg.codebook_size) == \
        (32, (1, 1, 2), 1, 16, 64)
    with torch.no_grad():
        z = tiny.encode_continuous(vqgan_reference["images"])
        codes = tiny.encode(vqgan_reference["images"])
        unclamped = tiny.decode_latent(tiny.lookup(codes))
        recon = tiny.decode(codes)
    assert codes.dtype == torch.int64 and codes.shape == (2, 64)
    assert torch.equal(codes, vqgan_reference["codes"])
    assert (z - vqgan_reference["encoder_out"]).abs().max() < 1e-4
    assert (tiny.lookup(codes) - vqgan_reference["quantized"]).abs().max() < 1e-6
    assert (unclamped - vqgan_reference["recon_unclamped"]).abs().max() < 1e-4
    assert (recon - vqgan_reference["recon"]).abs().max() < 1e-4
    assert recon.min() >= 0 and recon.max() <= 1


def test_quantizer_distance_and_ties():
    q = VQGAN(VQGANConfig.preset("digits_f4_32")).quantize
    with torch.no_grad():
        q.embedding.weight.zero_()
        q.embedding.weight[5] = 1.0
        q.embedding.weight[9] = 1.0  # duplicate of 5: the tie must go to the first index
    z = torch.ones(1, 16, 2, 2)
    z[0, :, 1, 1] = 0.0
    codes, quantized = q(z)
    assert codes.tolist() == [[5, 5, 5, 0]]
    assert torch.equal(quantized[0, :, 1, 1], torch.zeros(16))


def test_official_residual_quirk_shape():
    m = VQGAN(VQGANConfig.preset("maskgit_f16_256"))
    sd = m.state_dict()
    assert list(sd["encoder.down.2.block.0.nin_shortcut.weight"].shape) == [256, 256, 1, 1]
    assert "encoder.down.1.block.0.nin_shortcut.weight" not in sd


def test_f16_256_manifest_keys_and_roundtrip():
    manifest = read_key_manifest("maskgit_vqgan_f16_256_keys.tsv")
    assert len(manifest) == 168
    g = torch.Generator().manual_seed(0)
    # cheap random values: 0.02-scaled normals (54.5M parameters, ~220 MB)
    state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in manifest.items()}
    assert sum(v.numel() for v in state.values()) == 54_515_587
    cfg = infer_config(state)
    assert cfg == VQGANConfig.preset("maskgit_f16_256")
    model = load_official_tokenizer(state)
    assert list(model.state_dict()) == list(manifest)  # same order as the official state dict
    image = torch.rand(1, 3, 256, 256, generator=g)
    t0 = time.time()
    codes = model.encode(image)
    recon = model.decode(codes)
    elapsed = time.time() - t0
    assert codes.shape == (1, 256) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024
    assert recon.shape == (1, 3, 256, 256) and recon.min() >= 0 and recon.max() <= 1
    print(f"f16-256 encode+decode of one 256x256 image: {elapsed:.2f} s")


def test_missing_key_named(vqgan_reference):
    state = cloned_state(vqgan_reference)
    del state["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.bias.*\[3\]"):
        load_official_tokenizer(state)


def test_missing_inference_key_named(vqgan_reference):
    state = cloned_state(vqgan_reference)
    del state["encoder.conv_out.weight"]
    with pytest.raises(ValueError, match=r"encoder\.conv_out\.weight"):
        load_official_tokenizer(state)


def test_extra_key_named(vqgan_reference):
    state = cloned_state(vqgan_reference)
    state["decoder.extra.weight"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"decoder\.extra\.weight.*\[4, 2\]"):
        load_official_tokenizer(state)


def test_misshaped_key_names_both_shapes(vqgan_reference):
    state = cloned_state(vqgan_reference)
    state["decoder.up.1.upsample_conv.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"decoder\.up\.1\.upsample_conv\.bias.*\[7\].*\[32\]"):
        load_official_tokenizer(state)


def test_explicit_config_checked(vqgan_reference):
    ok = load_official_tokenizer(vqgan_reference["state_dict"], VQGANConfig.preset("digits_f4_32"))
    assert ok.config.resolution == 32
    wrong = VQGANConfig.preset("digits_f4_32", codebook_size=128)
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\[64, 16\].*\[128, 16\]"):
        load_official_tokenizer(vqgan_reference["state_dict"], wrong)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_official_tokenizer(tmp_path / "nope.bin")
    msg = str(err.value)
    assert "nope.bin" in msg and "maskgit-vqgan-imagenet-f16-256.bin" in msg and "fun-research/TiTok" in msg


def test_project_format_roundtrip_and_dispatch(vqgan_reference, tiny, tmp_path):
    save_tokenizer(tiny, tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"model.safetensors", "config.json"}
    for loaded in (load_tokenizer(tmp_path / "tok"), load_any_tokenizer(tmp_path / "tok"),
                   load_any_tokenizer(tmp_path / "tok" / "model.safetensors")):
        assert loaded.config == tiny.config
        assert torch.equal(loaded.encode(vqgan_reference["images"]), vqgan_reference["codes"])
    torch.save(vqgan_reference["state_dict"], tmp_path / "official.bin")
    official = load_any_tokenizer(tmp_path / "official.bin")
    assert torch.equal(official.encode(vqgan_reference["images"]), vqgan_reference["codes"])
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(ValueError, match="neither"):
        load_any_tokenizer(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any_tokenizer(tmp_path / "missing.bin")


def test_bad_inputs_named(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 1, 32, 32\)"):
        tiny.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(hidden_channels=48)
    with pytest.raises(ValueError, match="unknown VQGAN preset"):
        VQGANConfig.preset("nope")
