"""The judge of open-ended answers: a local causal LM folder loaded like a real checkpoint, batched with left
padding, asked about the answer each method generates, and named in the report."""

import json
import shutil

import pytest
import torch

from unipers.config import load_config
from unipers.data.manifest import Sample
from unipers.eval import runner
from unipers.eval.judge import Judge
from unipers.eval.prompts import PERSONAL
from unipers.eval.targets import load_targets
from unipers.models.embedders import MetricModelError

FAST = ["eval.max_new_tokens=4", "eval.batch_size=4", "eval.bootstrap=0"]
OPEN = [Sample("qa", "bo", "test", question="What does <bo> wear?", answer="<bo> wears a red collar."),
        Sample("vqa", "bo", "test", image="images/val_000.png", question="Where is <bo>?", answer="On the grass.")]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer trained here, saved as a real folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Does the candidate answer agree with the reference answer? Answer yes or no.", "yes no"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("judge") / "judge"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=0, eos_token_id=1)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_a_judge_folder_loads_and_batches_like_one_prompt_at_a_time(judge_dir, tmp_path):
    questions = ["Where does bo live?", "What colour is bo?", "Is bo old?"]
    references = ["bo lives in the kitchen.", "bo is purple.", "bo is three."]
    candidates = ["In the kitchen.", "Yellow, I think, or maybe a bit orange.", ""]
    alone = [Judge.load(judge_dir, batch_size=1).p_yes("bo", [q], [r], [c])[0]
             for q, r, c in zip(questions, references, candidates)]
    together = Judge.load(judge_dir, batch_size=8).p_yes("bo", questions, references, candidates)
    assert all(0.0 < p < 1.0 for p in together)
    assert together == pytest.approx(alone, abs=1e-5)  # left padding and positions do not change a verdict

    with pytest.raises(MetricModelError, match="eval.judge_path=.*no config.json"):
        Judge.load(tmp_path)


def with_open_questions(prepared_concepts, root):
    folders = [shutil.copytree(f, root / f.name) for f in prepared_concepts]
    with open(folders[0] / "manifest.jsonl", "a") as f:
        f.writelines(s.to_json() + "\n" for s in OPEN)
    return folders


class KeywordJudge:
    """Says yes when the candidate holds the reference's last word; remembers what it was asked."""
    name = "keyword judge"

    def __init__(self):
        self.asked = []

    def p_yes(self, name, questions, references, candidates):
        self.asked += list(zip(questions, references, candidates))
        return [1.0 if r.rstrip(".").split()[-1] in c else 0.0 for r, c in zip(references, candidates)]


def test_open_answers_are_generated_then_judged(session, prepared_concepts, tmp_path, monkeypatch):
    folders = with_open_questions(prepared_concepts, tmp_path)
    target = load_targets(folders, ["bo"])["bo"]
    assert [len(target.open[t]) for t in ("qa", "vqa")] == [1, 1] and all(len(v) == 0 for v in target.choices.values())
    settings = load_config([], FAST).eval
    judge = KeywordJudge()

    def answer(seq):
        text = session.decode(seq)
        return "It wears a red collar." if "wear" in text else "In the house." if "Where is" in text else "No."

    monkeypatch.setattr(runner, "generate_answers", lambda session_, seqs, *a, **k: [([1], answer(s)) for s in seqs])
    metrics, counts, samples = runner.Evaluator(session, settings, judge=judge).score(target, PERSONAL)
    asked = [a for a in judge.asked if a[0] in ("What does bo wear?", "Where is bo?")]
    assert sorted(asked) == [("What does bo wear?", "bo wears a red collar.", "It wears a red collar."),
                             ("Where is bo?", "On the grass.", "In the house.")]  # markers as the plain name
    assert (metrics["qa/judge"], metrics["vqa/judge"]) == (1.0, 0.0) and counts["qa/judge_n"] == 1
    assert samples["qa/judge"]["values"] == [1.0]


def test_eval_names_its_judge_or_says_what_it_left_out(session, prepared_concepts, judge_dir, tmp_path):
    folders = with_open_questions(prepared_concepts, tmp_path / "data")
    common = dict(concept_files=[session.files["bo"]], data=folders, generation=False, baselines=False)
    cfg = load_config([], FAST + [f"eval.judge_path={judge_dir}"])
    result = runner.run_eval(cfg, runner.EvalRequest(out=tmp_path / "judged", **common), session=session,
                             log=lambda m: None)
    assert result["models"]["judge"] == str(judge_dir) and 0.0 <= result["concepts"]["bo"]["qa/judge"] <= 1.0
    assert f"judged by {judge_dir}" in (tmp_path / "judged" / "report.md").read_text()
    plain = runner.run_eval(load_config([], FAST), runner.EvalRequest(out=tmp_path / "plain", **common),
                            session=session, log=lambda m: None)
    assert "qa/judge" not in plain["concepts"]["bo"]
    assert "2 open-ended question(s) not scored: set eval.judge_path" in json.dumps(plain["data"]["bo"]["notes"])
    session.load(common["concept_files"][0])  # run_eval leaves the session with no concepts loaded
