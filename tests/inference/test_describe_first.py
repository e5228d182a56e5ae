"""Recognition in two turns, "describe, then decide" (``backbone.describe_first``): one layout in training,
validation, `recognize` and `unipers eval`, with the description computed without any concept."""

import pytest
import torch
from PIL import Image

from unipers.concepts.prompts import IGNORE_INDEX, PromptError
from unipers.config import ConfigError, load_config
from unipers.concepts.recognition import recognition_layout
from unipers.inference import InferenceSession

DESCRIBE = ["backbone.describe_first='What is in this photo?'", "backbone.describe_tokens=5"]


@pytest.fixture(scope="module")
def described(tiny_dirs):
    """A session asking described recognition, with <bo> and <mam> moved away from their init."""
    s = InferenceSession.from_config(load_config([], DESCRIBE))
    for name, word in (("bo", "dog"), ("mam", "cat")):
        s.model.add_concept(name, word)
        with torch.no_grad():
            for p in s.model.bank.rows[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return s


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("described")
    paths = []
    for i, colour in enumerate([(200, 120, 40), (40, 80, 200), (30, 160, 60)]):
        im = Image.new("RGB", (64, 64), colour)
        im.paste((250, 250, 250), (8 * i, 10, 30 + 8 * i, 40))
        im.save(root / f"p{i}.png")
        paths.append(root / f"p{i}.png")
    return paths


def test_config_checks_the_question():
    with pytest.raises(ConfigError, match="describe_first"):
        load_config([], ["backbone.describe_first=' '"])
    with pytest.raises(ConfigError, match="describe_tokens"):
        load_config([], ["backbone.describe_tokens=0"])
    assert load_config([]).backbone.describe_first is None  # asking directly stays the default


def test_layout_is_turn_one_with_the_description_then_turn_two(described):
    p, tok = described.model.prompts, described.backbone.tokenizer
    image = torch.arange(p.boi_id + 1, p.boi_id + 1 + 4)  # any ids: the layout only copies them
    description = tok("A red dog.", add_special_tokens=False).input_ids
    enc = p.encode_described_qa("Is <bo> in this photo?", "Yes.", image=image, description=description)
    one = p.encode_question("<image>\nWhat is in this photo?", images=[image], mode="plain")
    two = p.encode_qa("Is <bo> in this photo?", "Yes.")
    assert enc.ids == one + description + [tok.eos_token_id] + two.ids[1:]  # one BOS for both turns
    assert enc.labels == [IGNORE_INDEX] * (len(one) + len(description) + 1) + two.labels[1:]
    assert p.bank.info["bo"].first_id not in enc.ids[: len(one) + len(description) + 1]  # no concept in turn one
    asked = p.encode_described_question("Is <bo> in this photo?", image=image, description=description)
    assert asked == enc.ids[: len(asked)] and asked[-1] == tok.sep_token_id
    with pytest.raises(PromptError, match="turn one"):
        p.encode_described_qa("<image>\nIs <bo> here?", "Yes.", image=image, description=description)


def test_the_description_is_the_bases_own_and_no_concept_changes_it(described, photos, tiny_dirs):
    tokens = described.image_tokens(photos)
    got = described.model.describe(tokens, batch_size=2)
    alone = [described.model.describe([t])[0] for t in tokens]  # left padding changes nothing
    assert got == alone and all(0 < len(d) <= 5 for d in got)
    bb, p = described.backbone, described.model.prompts
    for t, d in zip(tokens, got):  # greedy, one token at a time, from the full logits
        ids = torch.tensor([p.describe_prompt(t)])
        for want in d:
            assert int(bb.full_logits(ids)[0, -1].argmax()) == want
            ids = torch.cat([ids, torch.tensor([[want]])], 1)
    bare = InferenceSession.from_config(load_config([], DESCRIBE))  # no concept loaded at all
    assert bare.model.describe(tokens) == got


def test_recognize_eval_and_validation_decide_alike(described, photos, prepared_concepts):
    """`recognize`, `unipers eval` and the training collator build the same ids, so the same Yes/No."""
    from unipers.data.collate import Collator, Record
    from unipers.data.manifest import Sample
    from unipers.eval.prompts import PERSONAL
    from unipers.eval.runner import Evaluator
    from unipers.eval.scoring import Prompter, first_token_logits
    from unipers.eval.targets import load_targets

    s, p = described, described.model.prompts
    tokens = s.image_tokens(photos)
    descriptions = s.model.describe(tokens)
    question = "Is <bo> in this photo?"
    seqs = s.recognition_prompts(question, tokens)
    assert seqs == [p.encode_described_question(question, image=t, description=d) for t, d in zip(tokens, descriptions)]
    logits = first_token_logits(s, seqs)
    yes, no = (s.backbone.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    probs = torch.softmax(logits[:, [yes, no]], -1)[:, 0]
    assert torch.allclose(torch.tensor(s.recognize("bo", photos)), probs, atol=1e-6)

    target = load_targets(prepared_concepts, ["bo"])["bo"]
    ev = Evaluator(s, load_config([], ["eval.batch_size=2"]).eval)
    prompter = Prompter(s, target, PERSONAL)
    assert prompter.recognition(recognition_layout(p), question, tokens[0], descriptions[0]) == seqs[0]
    assert ev.descriptions(photos) == descriptions

    keys = [str(x) for x in photos]
    collate = Collator(p, s.backbone.tokenizer.pad_token_id, dict(zip(keys, tokens)), {},
                       descriptions=dict(zip(keys, descriptions)))
    records = [Record(Sample("recognition", "bo", "val", image=x.name, question=question, answer="Yes.", label=True),
                      x.parent) for x in photos]
    batch = collate(records)["und"]
    for row, seq in enumerate(seqs):
        first = int((batch["labels"][row] != IGNORE_INDEX).float().argmax())
        assert batch["ids"][row, :first].tolist() == seq  # the answer starts where recognize reads Yes/No
    caption = Record(Sample("caption", "bo", "val", image=photos[0].name, question="Describe this image.",
                            answer="A photo of <bo>."), photos[0].parent)
    assert collate([caption])["und"]["ids"][0].tolist() == p.encode_qa(
        "<image>\nDescribe this image.", "A photo of <bo>.", images=[tokens[0]]).ids  # other tasks: one turn


def test_datamodule_caches_descriptions_and_validation_reads_turn_two(prepared_concepts, monkeypatch):
    from unipers.data.datamodule import ConceptDataModule
    from unipers.models.unified import UnifiedModel

    model = UnifiedModel.from_config(load_config([], DESCRIBE + ["bank.num_shared=2", "bank.num_und=2"]))
    model.add_concept("bo", "dog")
    model.add_concept("mam", "cat")
    dm = ConceptDataModule(prepared_concepts, batch_size=4, seed=0, task_weights={"recognition": 1.0})
    dm.attach(model)
    assert list((prepared_concepts[0] / "cache").glob("descriptions-*.safetensors"))
    eos = model.backbone.tokenizer.eos_token_id
    batch = next(iter(dm.train_dataloader()))["und"]
    for ids, labels in zip(batch["ids"], batch["labels"]):
        first = int((labels != IGNORE_INDEX).float().argmax())
        assert eos in ids[:first].tolist()  # turn one ended before the labelled answer
        assert model.prompts.boi_id in ids[:first].tolist()

    def boom(*a, **k):
        raise AssertionError("described an image whose description was cached")

    monkeypatch.setattr(model, "describe", boom)
    ConceptDataModule(prepared_concepts, batch_size=4, seed=0).attach(model)  # a second run reads the cache


def test_ask_described_answers_after_the_description(described, photos):
    from unipers.inference import InputError

    bb = described.backbone
    seq = described.recognition_prompts("Is <bo> in this photo?", described.image_tokens(photos[:1]))[0]
    new = bb.generate(torch.tensor([seq]), max_new_tokens=6)[0].tolist()
    answer = described.ask("Is <bo> in this photo?", photos[:1], max_new_tokens=6, described=True)
    assert answer == described.decode(new)
    with pytest.raises(InputError, match="exactly one image"):
        described.ask("Is <bo> in this photo?", photos[:2], described=True)


def test_a_concept_file_records_the_layout_and_is_refused_under_the_other(concept_files, tmp_path):
    from unipers.concepts.io import ConceptFileError, read_metadata

    plain = InferenceSession.from_config(load_config([]))
    plain.load(concept_files["bo"])
    assert read_metadata(concept_files["bo"])["describe_first"] == ""
    with pytest.raises(ConceptFileError, match=r"bo.safetensors: trained with backbone.describe_first=None"):
        InferenceSession.from_config(load_config([], DESCRIBE)).load(concept_files["bo"])
    described = InferenceSession.from_config(load_config([], DESCRIBE))
    described.model.add_concept("rex", "dog")
    path = described.model.save_concepts(tmp_path / "rex.safetensors")
    assert read_metadata(path)["describe_first"] == "What is in this photo?"
    with pytest.raises(ConceptFileError, match="rex.safetensors: trained with backbone.describe_first='What is in"):
        plain.load(path)
    described.unload()
    assert described.load(path) == ["rex"]
