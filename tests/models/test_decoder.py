"""DiffusionDecoder on a tiny random SD-format folder: frozen yet differentiable in the conditioning, loss
targets per prediction type, and a sampler whose batching, CFG and masking do not change the images."""

import importlib.util
import json

import pytest
import torch
from diffusers import DDPMScheduler

from unipers.models.connector import Conditioning, Connector
from unipers.models.decoder import DiffusionDecoder
from unipers.models.tiny_decoder import build_tiny_decoder

D = 64  # cross_attention_dim and pooled_dim of the tiny decoder
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {pt: build_tiny_decoder(root / pt, prediction_type=pt)
            for pt in ("epsilon", "v_prediction", "flow_matching")}


@pytest.fixture(scope="module")
def decoder(folders):
    return DiffusionDecoder.from_pretrained(folders["epsilon"])


def make_cond(batch: int, length: int, seed: int, masked_tail: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if masked_tail:
        mask[:, -masked_tail:] = False
    return Conditioning(torch.randn(batch, length, D, generator=g), mask, torch.randn(batch, D, generator=g))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=gen(seed))


# ---- folder, loading, freezing ---------------------------------------------------------------------------


def test_tiny_decoder_folder_reloads_and_is_deterministic(tmp_path, folders, decoder):
    index = json.loads((folders["epsilon"] / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (decoder.cross_attention_dim, decoder.pooled_dim, decoder.latent_channels) == (D, D, 4)
    assert (decoder.latent_size, decoder.image_size, decoder.vae_scale_factor) == (16, 32, 2)
    assert decoder.prediction_type == "epsilon"
    again, other = build_tiny_decoder(tmp_path / "again"), build_tiny_decoder(tmp_path / "other", seed=1)
    for sub in ("unet", "vae"):
        weights = f"{sub}/diffusion_pytorch_model.safetensors"
        assert (again / weights).read_bytes() == (folders["epsilon"] / weights).read_bytes()
        assert (other / weights).read_bytes() != (folders["epsilon"] / weights).read_bytes()
    no_pool = DiffusionDecoder.from_pretrained(build_tiny_decoder(tmp_path / "np", pooled_dim=None))
    assert no_pool.pooled_dim is None


def test_frozen_by_construction(decoder):
    assert not any(p.requires_grad for p in decoder.parameters())
    decoder.train()
    assert not any(m.training for m in decoder.modules())


def test_xformers_on_cpu_fails_clearly(folders):
    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers and CUDA present: the switch is usable here")
    with pytest.raises(RuntimeError, match="xformers.*sdpa"):
        DiffusionDecoder.from_pretrained(folders["epsilon"], attention="xformers")
    with pytest.raises(ValueError, match="flash"):
        DiffusionDecoder.from_pretrained(folders["epsilon"], attention="flash")


def test_encode_images(decoder):
    pixels = torch.rand(2, 3, 32, 32, generator=gen(0)) * 2 - 1
    mean = decoder.encode_images(pixels)
    assert mean.shape == (2, 4, 16, 16) and torch.equal(mean, decoder.encode_images(pixels))
    drawn = decoder.encode_images(pixels, generator=gen(1), sample=True)
    assert torch.equal(drawn, decoder.encode_images(pixels, generator=gen(1), sample=True))
    assert not torch.equal(drawn, mean)


# ---- loss ---------------------------------------------------------------------------------------------


def test_loss_trains_the_conditioning_only(decoder):
    cond = make_cond(2, 5, seed=0, masked_tail=1)
    cond.embeds.requires_grad_(True)
    cond.pooled.requires_grad_(True)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    opt = torch.optim.AdamW([cond.embeds, cond.pooled], lr=1e-2, weight_decay=0.1)
    loss = decoder.loss(latents(), cond, generator=gen(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert cond.embeds.grad[:, :4].abs().sum() > 0 and cond.pooled.grad.abs().sum() > 0
    assert (cond.embeds.grad[:, 4] == 0).all()  # the masked position gets nothing
    assert all(p.grad is None for p in decoder.parameters())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())


def test_connector_trains_through_the_decoder(decoder):
    torch.manual_seed(0)
    connector = Connector("mlp", 16, decoder.cross_attention_dim, pooled_dim=decoder.pooled_dim)
    cond = connector(torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool))
    decoder.loss(latents(), cond, generator=gen(0)).backward()
    assert all(p.grad is not None for p in connector.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_matching"])
def test_loss_target_matches_hand_computation(folders, prediction_type):
    dec = DiffusionDecoder.from_pretrained(folders[prediction_type])
    assert dec.prediction_type == prediction_type
    x, noise, cond = latents(), torch.randn(2, 4, 16, 16, generator=gen(5)), make_cond(2, 4, seed=1)
    t = torch.tensor([10, 700])
    if prediction_type == "flow_matching":
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        noisy, target = sigma * noise + (1 - sigma) * x, noise - x
    else:
        a = dec.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x
    with torch.no_grad():
        pred = dec.unet(noisy, t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                        class_labels=cond.pooled).sample
        expected = (pred - target).square().mean()
        got = dec.loss(x, cond, timesteps=t, noise=noise)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_loss_errors_name_the_problem(decoder):
    odd = DiffusionDecoder(decoder.vae, decoder.unet, DDPMScheduler(prediction_type="x0_and_eps"))
    with pytest.raises(ValueError, match="x0_and_eps"):
        odd.loss(latents(), make_cond(2, 3, seed=0))
    cond = make_cond(2, 3, seed=0)
    with pytest.raises(ValueError, match="pooled"):
        decoder.loss(latents(), Conditioning(cond.embeds, cond.mask, None))


# ---- sampling -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conds():
    # cond is longer than uncond and has masked positions: batching must pad uncond.
    return make_cond(2, 6, seed=2, masked_tail=2), make_cond(1, 2, seed=3)


def test_same_seed_same_images_in_range_and_size(decoder, conds):
    cond, uncond = conds
    a = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0))
    b = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    c = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0), height=24, width=40)
    assert c.shape == (2, 3, 24, 40) and c.min() >= 0 and c.max() <= 1


def test_batched_cfg_equals_two_calls(decoder, conds):
    cond, uncond = conds
    batched = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0))
    separate = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0), batched_cfg=False)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", [None, "ddpm"])  # ddpm also draws noise at every step
def test_batch_with_generator_list_equals_single_runs(decoder, conds, sampler):
    cond, uncond = conds
    both = decoder.sample(cond, uncond, num_steps=STEPS, generator=[gen(0), gen(1)], scheduler=sampler)
    for i in range(2):
        single = decoder.sample(cond[i], uncond, num_steps=STEPS, generator=gen(i), scheduler=sampler)
        torch.testing.assert_close(both[i:i + 1], single, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 generators"):
        decoder.sample(cond, uncond, num_steps=STEPS, generator=[gen(0)] * 3)


def test_guidance_at_most_one_skips_uncond(decoder, conds):
    cond, uncond = conds
    plain = decoder.sample(cond, None, num_steps=STEPS, guidance=1.0, generator=gen(0))
    assert torch.equal(plain, decoder.sample(cond, uncond, num_steps=STEPS, guidance=1.0, generator=gen(0)))
    guided = decoder.sample(cond, uncond, num_steps=STEPS, guidance=5.0, generator=gen(0))
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="uncond"):
        decoder.sample(cond, None, num_steps=STEPS, guidance=5.0)


def test_masked_positions_do_not_change_the_image(decoder, conds):
    cond, uncond = conds
    noisy = cond.embeds.clone()
    noisy[~cond.mask] = torch.randn(int((~cond.mask).sum()), D) * 100
    changed = Conditioning(noisy, cond.mask, cond.pooled)
    a = decoder.sample(cond, uncond, num_steps=STEPS, generator=gen(0))
    b = decoder.sample(changed, uncond, num_steps=STEPS, generator=gen(0))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    noisy[:, 0] = torch.randn(2, D) * 100  # a kept position does matter
    c = decoder.sample(Conditioning(noisy, cond.mask, cond.pooled), uncond, num_steps=STEPS, generator=gen(0))
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpm"])
def test_other_samplers_run(decoder, conds, sampler):
    images = decoder.sample(conds[0], conds[1], num_steps=STEPS, generator=gen(0), scheduler=sampler)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        decoder.sample(conds[0], conds[1], num_steps=STEPS, scheduler="plms")


def test_flow_matching_samples(folders, conds):
    dec = DiffusionDecoder.from_pretrained(folders["flow_matching"])
    a = dec.sample(conds[0], conds[1], num_steps=STEPS, generator=gen(0))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, dec.sample(conds[0], conds[1], num_steps=STEPS,
                                                                     generator=gen(0)))
    with pytest.raises(ValueError, match="flow-matching"):
        dec.sample(conds[0], conds[1], num_steps=STEPS, scheduler="ddim")


def test_per_sample_generators_make_noise_independent_of_the_batch(decoder):
    """A sample's loss depends on its own generator only: the basis of DDP == one process."""
    dec = decoder
    latents = torch.randn(3, dec.latent_channels, dec.latent_size, dec.latent_size, generator=torch.Generator().manual_seed(0))
    cond = make_cond(3, 5, seed=1)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = dec.loss(latents, cond, generator=gens([7, 8, 9]), reduction="none")
    alone = dec.loss(latents[1:2], cond[1], generator=gens([8]), reduction="none")
    assert batch.shape == (3,) and torch.allclose(batch[1:2], alone, atol=1e-6)
