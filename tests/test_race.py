"""RACE: Megatron-LM's input layout on real questions, and accuracy bookkeeping."""

import jax
import numpy as np
from conftest import bert_config, device_mesh

from megajax import config
from megajax.data import corpora
from megajax.data.loader import race_splits
from megajax.data.samples import RaceQuestions
from megajax.data.tokenizer import BertTokenizer
from megajax.evals import race
from megajax.models import bert
from megajax.trainer import Trainer

TOK = BertTokenizer("data/bert/vocab.txt")


def _rows():
    return corpora.read_race(["data/race"])


def test_layout_fills_the_blank_and_cuts_the_article_at_its_end():
    rows = _rows()
    blank = next(r for r in rows if "_" in r["question"])
    plain = next(r for r in rows if "_" not in r["question"])
    questions = RaceQuestions([blank, plain], TOK, max_len=128)
    for i, row in enumerate((blank, plain)):
        sample = questions[i]
        assert sample["tokens"].shape == (4, 128) and int(sample["label"]) == row["answer"]
        for j, option in enumerate(row["options"]):
            ids, types = sample["tokens"][j], sample["token_types"][j]
            n = int(sample["padding_mask"][j].sum())
            sep = int(np.argmax(ids == TOK.sep_id))
            if "_" in row["question"]:
                qa = row["question"].replace("_", option)
            else:
                qa = row["question"] + " " + option
            assert ids[0] == TOK.cls_id and list(ids[1:sep]) == TOK.encode(qa)
            article = TOK.encode(" ".join(row["article"].split()))
            assert len(article) > 128  # these articles are longer than the window: cut at the end
            assert n == 128 and ids[n - 1] == TOK.sep_id
            assert list(ids[sep + 1 : n - 1]) == article[: n - sep - 2]
            assert (types[: sep + 1] == 0).all() and (types[sep + 1 : n] == 1).all()


def test_short_inputs_are_padded():
    row = dict(_rows()[0], article="A short story .")
    sample = RaceQuestions([row], TOK, max_len=64)[0]
    n = sample["padding_mask"].sum(1)
    assert (n < 64).all()
    for j in range(4):
        assert (sample["tokens"][j, n[j] :] == TOK.pad_id).all()
        assert (sample["token_types"][j, n[j] :] == 0).all()


def test_validation_holds_out_whole_passages_of_each_level():
    cfg = config.replace(config.Config(), data=dict(val_fraction=0.5))
    train, val = race_splits(cfg, ["data/race"])
    assert {r["passage"] for r in train}.isdisjoint({r["passage"] for r in val})
    assert len({r["passage"] for r in val}) == 2 and len(train) + len(val) == len(_rows())
    assert {r["level"] for r in val} == {r["level"] for r in train} == {"high", "middle"}


def test_accuracy_counts_each_question_once_overall_and_per_level():
    rows = [dict(answer=a, level=lvl) for a, lvl in [(0, "middle"), (1, "middle"), (2, "high")]]
    result = race._accuracies(rows, [0, 3, 2])
    assert result == {
        "accuracy": 2 / 3,
        "n": 3,
        "accuracy_high": 1.0,
        "n_high": 1,
        "accuracy_middle": 0.5,
        "n_middle": 2,
    }


def test_score_predicts_the_highest_option_of_every_question():
    cfg = bert_config(arch="bert_multiple_choice", seq_len=64)  # tests/test_bert.py's model
    trainer = Trainer(cfg, device_mesh(2, 4))
    params = trainer.init_state()["params"]
    questions = RaceQuestions(_rows()[:11], TOK, max_len=64)  # a partial last batch of 8
    result = race.score(trainer, params, questions)
    # The expected predictions from batches built here: the 11 questions, then question 10
    # repeated to fill the second batch (rows never mix, so any filler will do).
    order = list(range(11)) + [10] * 5
    with trainer.context():
        f = jax.jit(lambda p, b: bert.choice_logits(trainer.model(p), b))
        expected = []
        for start in (0, 8):
            rows = [questions[i] for i in order[start : start + 8]]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            expected += list(np.asarray(f(params, trainer.put_eval_batch(batch))).argmax(-1))
    expected = [int(e) for e in expected[:11]]
    assert result == race._accuracies(questions.rows, expected) and result["n"] == 11
