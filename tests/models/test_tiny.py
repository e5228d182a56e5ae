"""The embedded default builds deterministically: the same seed is the same base on every machine."""

from unipers.models.backbone import ARBackbone
from unipers.models.tiny import build_tiny_chameleon


def test_same_seed_same_fingerprint_other_seed_differs(tmp_path, backbone_dir, other_backbone_dir):
    again = build_tiny_chameleon(tmp_path / "again", seed=0)
    fp = lambda p: ARBackbone.from_pretrained(p).base_fingerprint
    assert fp(again) == fp(backbone_dir)
    assert fp(other_backbone_dir) != fp(backbone_dir)


def test_processor_round_trip(backbone_dir):
    bb = ARBackbone.from_pretrained(backbone_dir)
    tok = bb.tokenizer
    assert len(tok) == bb.vocab_size and tok.sep_token == "<reserved08706>"
    text = "Is the dog in this photo?"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # The processor expands <image> to boi + image_seq_length placeholders + eoi, and appends sep.
    out = bb.processor(text="<image> hi", images=[__import__("PIL.Image").Image.new("RGB", (40, 40))])
    ids = out["input_ids"][0].tolist()
    assert ids.count(bb.processor.image_token_id) == bb.image_seq_length
    assert ids[-1] == tok.sep_token_id
