"""decoder.gradient_checkpointing on the embedded tiny decoder: the frozen UNet, still in eval, recomputes its
blocks in the backward pass, and neither the diffusion loss nor the conditioning's gradient changes."""

import pytest
import torch

from unipers.models.connector import Conditioning
from unipers.models.decoder import DiffusionDecoder

D = 64  # cross_attention_dim and pooled_dim of the embedded tiny decoder


@pytest.fixture(scope="module")
def decoders(decoder_dir):
    """{False: plain, True: checkpointed}, both after train() as Lightning leaves them."""
    return {on: DiffusionDecoder.from_pretrained(decoder_dir, gradient_checkpointing=on).train()
            for on in (False, True)}


def make_cond() -> Conditioning:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, -2:] = False
    return Conditioning(torch.randn(2, 6, D, generator=g).requires_grad_(),
                        mask, torch.randn(2, D, generator=g).requires_grad_())


def loss_and_grads(decoder: DiffusionDecoder):
    cond = make_cond()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(s) for s in (2, 3)]
    loss = decoder.loss(latents, cond, generator=generators)
    loss.backward()
    return loss.detach(), cond.embeds.grad, cond.pooled.grad


def test_same_loss_and_conditioning_gradient(decoders):
    plain, ckpt = loss_and_grads(decoders[False]), loss_and_grads(decoders[True])
    assert decoders[True].unet.is_gradient_checkpointing and not decoders[False].unet.is_gradient_checkpointing
    assert plain[1].abs().sum() > 0 and plain[2].abs().sum() > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_unet_weights_get_no_gradient_and_stay_put(decoders):
    decoder = decoders[True]
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    loss_and_grads(decoder)
    assert not any(p.requires_grad or p.grad is not None for p in decoder.parameters())
    after = decoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in decoder.modules())  # dropout stays off: nothing left eval mode


def test_blocks_really_recompute_in_backward(decoders):
    """Each checkpointed block runs once more during backward, and autograd saves less for it."""
    counts, saved = {}, {}
    for on, decoder in decoders.items():
        up = decoder.unet.up_blocks[0]  # CrossAttnUpBlock2D: a resnet and a transformer block, both checkpointed
        blocks = {"resnet": up.resnets[0], "transformer": up.attentions[0].transformer_blocks[0]}
        calls = dict.fromkeys(blocks, 0)
        # Pre-hooks: a non-reentrant recompute stops once it has what backward needs, before post-hooks run.
        handles = [m.register_forward_pre_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
                   for name, m in blocks.items()]
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                cond = make_cond()
                loss = decoder.loss(torch.zeros(2, 4, 16, 16), cond, generator=torch.Generator().manual_seed(0))
            forward_calls = dict(calls)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        counts[on], saved[on] = (forward_calls, dict(calls)), total[0]
    assert counts[False] == ({"resnet": 1, "transformer": 1}, {"resnet": 1, "transformer": 1})
    assert counts[True] == ({"resnet": 1, "transformer": 1}, {"resnet": 2, "transformer": 2})
    assert 0 < saved[True] < saved[False] / 2


def test_no_grad_runs_skip_checkpointing(decoders):
    """Validation and sampling run under no_grad: the same outputs, and no block runs twice."""
    calls = [0]
    handle = decoders[True].unet.up_blocks[0].resnets[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        with torch.no_grad():
            losses = [d.loss(torch.zeros(2, 4, 16, 16), make_cond(), generator=torch.Generator().manual_seed(0))
                      for d in (decoders[False], decoders[True])]
    finally:
        handle.remove()
    assert calls == [1] and torch.equal(losses[0], losses[1])


def test_config_switch_reaches_the_unet(tiny_dirs):
    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    assert load_config([]).decoder.gradient_checkpointing is False
    for name in ("decoder/sd15", "decoder/sd21"):  # shipped like backbone/anole-7b's, for 24 GB cards
        assert load_config([name]).decoder.gradient_checkpointing is True
    model = UnifiedModel.from_config(load_config([], ["decoder.gradient_checkpointing=true"]))
    assert model.decoder.unet.is_gradient_checkpointing
    model.train()
    assert not any(m.training for m in model.decoder.modules())
