"""The text metrics against the implementations they claim to reproduce (docs/metrics.md).

Test vectors and where they come from:

- huggingface/evaluate ``metrics/bleu/README.md`` (the two "Examples", full outputs), ``metrics/rouge/README.md``
  (single and multiple references), ``metrics/meteor/meteor.py`` docstring (0.6944).
- google-research ``rouge/rouge_scorer_test.py`` (shipped as ``rouge_score/rouge_scorer_test.py``): testRouge1,
  testRouge1Multi, testRougeAllMulti, testRougeEmpty, testRouge2, testRougeLConsecutive, testRougeLNonConsecutive.
- nltk ``nltk/translate/meteor_score.py`` doctests (``single_meteor_score``; ``meteor_score`` with three references).
- The m3d protocol: mirthAI/Med3DVLM ``src/eval/eval_vqa.py`` and ``src/eval/eval_caption.py``, BAAI-DCAI/M3D
  ``Bench/eval/eval_vqa.py``: texts stripped (``postprocess_text``), then per sample ``evaluate.load("bleu")`` with
  ``max_order=1``, ``evaluate.load("rouge")`` with ``rouge_types=["rouge1"]``, ``evaluate.load("meteor")``, written to
  a CSV and averaged; closed questions count as correct when ``answer_choice + "."`` is in the generated text.
  ``M3D_EXPECTED`` was computed by running exactly that loop with the evaluate modules themselves
  (huggingface/evaluate a7dd338 ``metrics/{bleu,rouge,meteor}``, ``nmt_bleu.py`` of 4c312af) on ``CORPUS``, offline.

Where the reference library is installed (sacrebleu, rouge_score, nltk), the metrics are also compared with it
directly on random-ish sentences.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from med3dqwen.evaluation import bleu, bleu_statistics, closed_accuracy, compute_metrics, meteor, rouge
from med3dqwen.evaluation.metrics import normalize_answer


REPO = Path(__file__).resolve().parents[2]
NLTK_DATA = REPO.parent / "shared" / "nltk_data"
TOL = 1e-9


@pytest.fixture
def nltk_data(monkeypatch) -> Path:
    """The shared WordNet + punkt_tab folder, via NLTK_DATA (set after nltk may have been imported)."""
    if not (NLTK_DATA / "corpora" / "wordnet").is_dir() or not (NLTK_DATA / "tokenizers" / "punkt_tab").is_dir():
        pytest.skip(f"NLTK data (wordnet, punkt_tab) not found at {NLTK_DATA}")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    return NLTK_DATA


# A small radiology-style corpus (pairs written for this test): stray spaces, punctuation, hyphens, numbers.
CORPUS_PREDICTIONS = [
    " There is a small nodule in the right upper lobe. ",
    "No pleural effusion.",
    "The liver shows a 12 mm hypodense lesion, likely a cyst.",
    "Axial",
    "Ground-glass opacity in the left lower lobe; no consolidation.",
    "The heart is enlarged.",
]
CORPUS_REFERENCES = [
    "A small nodule is seen in the right upper lobe.",
    "There is no pleural effusion. ",
    "A 12 mm hypodense lesion in the liver, consistent with a simple cyst.",
    "Axial plane",
    "Patchy ground-glass opacities in the left lower lobe without consolidation.",
    "Heart size is normal.",
]
# From the M3D / Med3DVLM loop run with the evaluate modules (see the module docstring); per-sample values kept too.
M3D_EXPECTED = {
    "bleu1": 0.5451517031918179,
    "rouge1": 0.7214285714285714,
    "meteor": 0.6110464064090505,
}
M3D_PER_SAMPLE_BLEU1 = [0.8181818181818182, 0.45489799478447507, 0.5935873286495363, 0.36787944117144233]
M3D_PER_SAMPLE_BLEU1 += [0.6363636363636364, 0.4]
# The same corpus through evaluate's modules as whole-corpus calls (bleu; rouge with use_aggregator=False, mean).
EVALUATE_CORPUS = {"bleu4": 0.3290008462453044, "rougeL": 0.6769841269841269, "meteor": 0.6110464064090505}
# ... and with a second reference "Nothing abnormal." for every sample.
EVALUATE_MULTI = {"bleu4": 0.36766471931133765, "bleu2": 0.5479825729755466, "rougeL": 0.6769841269841269}
EVALUATE_MULTI["meteor"] = 0.6110464064090505

WORDS = (
    "the a left right lower upper lobe lung nodule effusion pleural small large no evidence of mass liver kidney "
    "cyst 3 mm 12.5 cm , . ; ( ) - tumour tumor oedema edema area region is are seen there heart normal size "
    'enlarged consolidation opacity ground-glass Party\'s "quoted" x-ray &amp; 1-2 3,000 e.g. U.S. naïve café'
).split()


def random_sentences(seed: int, count: int, max_words: int = 16) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------


def test_bleu_matches_evaluates_documented_examples():
    # evaluate metrics/bleu/README.md, "Example where each prediction has 1 reference"
    predictions = ["hello there general kenobi", "foo bar foobar"]
    stats = bleu_statistics(predictions, [["hello there general kenobi"], ["foo bar foobar"]])
    assert stats == {
        "bleu": 1.0,
        "precisions": [1.0, 1.0, 1.0, 1.0],
        "brevity_penalty": 1.0,
        "length_ratio": 1.0,
        "translation_length": 7,
        "reference_length": 7,
    }
    # "Example where the first prediction has 2 references": the *shortest* reference ("hello there!" = 3 tokens
    # after 13a splits the "!") sets the reference length
    stats = bleu_statistics(predictions, [["hello there general kenobi", "hello there!"], ["foo bar foobar"]])
    assert stats["bleu"] == 1.0 and stats["reference_length"] == 6 and stats["translation_length"] == 7
    assert stats["length_ratio"] == pytest.approx(1.1666666666666667, abs=TOL)


def test_bleu_matches_evaluate_on_the_corpus():
    assert bleu(CORPUS_PREDICTIONS, CORPUS_REFERENCES) == pytest.approx(EVALUATE_CORPUS["bleu4"], abs=TOL)
    multi = [[ref, "Nothing abnormal."] for ref in CORPUS_REFERENCES]
    assert bleu(CORPUS_PREDICTIONS, multi) == pytest.approx(EVALUATE_MULTI["bleu4"], abs=TOL)
    assert bleu(CORPUS_PREDICTIONS, multi, max_order=2) == pytest.approx(EVALUATE_MULTI["bleu2"], abs=TOL)


@pytest.mark.parametrize("max_order", [1, 2, 4])
@pytest.mark.parametrize("seed", range(4))
def test_bleu_matches_sacrebleu_with_one_reference(seed, max_order):
    from sacrebleu.metrics import BLEU

    predictions = random_sentences(seed, 12)
    references = random_sentences(100 + seed, 12)
    # With one reference, sacrebleu's closest reference length is the shortest one, so the two definitions agree.
    expected = BLEU(tokenize="13a", smooth_method="none", max_ngram_order=max_order).corpus_score(
        predictions, [references]
    )
    assert bleu(predictions, references, max_order=max_order) == pytest.approx(expected.score / 100, abs=TOL)


def test_bleu_brevity_penalty_uses_the_shortest_reference():
    # one 4-token prediction, references of 2 and 5 tokens: evaluate counts 2 (sacrebleu's closest would be 5)
    stats = bleu_statistics(["a b c d"], [["a b", "a b c d e"]], max_order=1)
    assert stats["reference_length"] == 2 and stats["brevity_penalty"] == 1.0 and stats["bleu"] == 1.0


def test_bleu_of_empty_texts_is_zero():
    stats = bleu_statistics([""], ["a b"])
    assert stats["bleu"] == 0.0 and stats["brevity_penalty"] == 0.0 and stats["length_ratio"] == 0.0
    assert bleu(["a b"], [""]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "references", "rouge_type", "expected"),
    [
        # rouge_scorer_test.py (score(target, prediction) there; (prediction, reference) here)
        ("testing", "testing one two", "rouge1", 1 / 2),  # testRouge1
        ("testing", ["testing one two"], "rouge1", 1 / 2),  # testRouge1Multi
        ("text first", ["first text", "first something"], "rouge1", 1.0),  # testRougeAllMulti
        ("text first", ["first text", "first something"], "rouge2", 0.0),
        ("text first", ["first text", "first something"], "rougeL", 0.5),
        ("", "testing one two", "rougeL", 0.0),  # testRougeEmpty
        ("testing one", "testing one two", "rouge2", 2 / 3),  # testRouge2
        ("testing one", "testing one two", "rougeL", 4 / 5),  # testRougeLConsecutive
        ("testing two", "testing one two", "rougeL", 4 / 5),  # testRougeLNonConsecutive
    ],
)
def test_rouge_matches_rouge_score_tests(prediction, references, rouge_type, expected):
    assert rouge([prediction], [references], rouge_type=rouge_type) == pytest.approx(expected, abs=TOL)


def test_rouge_matches_evaluates_documented_examples():
    # evaluate metrics/rouge/README.md: identical texts → 1.0; lists of references → 0.8333 / 0.5
    predictions = ["hello there", "general kenobi"]
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert rouge(predictions, ["hello there", "general kenobi"], rouge_type) == 1.0
    multi = [["hello", "there"], ["general kenobi", "general yoda"]]
    assert rouge(predictions, multi, "rouge1") == pytest.approx(5 / 6, abs=TOL)  # README: 0.8333
    assert rouge(predictions, multi, "rouge2") == pytest.approx(0.5, abs=TOL)
    assert rouge(predictions, multi, "rougeL") == pytest.approx(5 / 6, abs=TOL)
    assert rouge(CORPUS_PREDICTIONS, CORPUS_REFERENCES) == pytest.approx(EVALUATE_CORPUS["rougeL"], abs=TOL)


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL"])
@pytest.mark.parametrize("seed", range(3))
def test_rouge_matches_rouge_score_directly(seed, rouge_type):
    from rouge_score import rouge_scorer

    predictions = random_sentences(seed, 10)
    references = [random_sentences(1000 * seed + i, 1 + i % 3) for i in range(10)]
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=False)
    pairs = zip(predictions, references, strict=True)
    best = [max(scorer.score(r, p)[rouge_type].fmeasure for r in refs) for p, refs in pairs]
    assert rouge(predictions, references, rouge_type) == pytest.approx(sum(best) / len(best), abs=TOL)


# ---------------------------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------------------------

GUIDE_HYPOTHESIS = "It is a guide to action which ensures that the military always obeys the commands of the party"
GUIDE_REFERENCES = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]


def test_meteor_matches_the_documented_examples(nltk_data):
    from nltk.translate.meteor_score import meteor_score, single_meteor_score

    # evaluate metrics/meteor/meteor.py docstring and nltk's single_meteor_score doctest: 0.6944
    one = meteor([GUIDE_HYPOTHESIS], [GUIDE_REFERENCES[0]])
    assert round(one, 4) == 0.6944
    assert one == pytest.approx(single_meteor_score(GUIDE_REFERENCES[0].split(), GUIDE_HYPOTHESIS.split()), abs=TOL)
    # nltk's meteor_score doctest with three references: 0.6944 (the best reference)
    three = meteor([GUIDE_HYPOTHESIS], [GUIDE_REFERENCES])
    assert round(three, 4) == 0.6944
    assert three == pytest.approx(
        meteor_score([r.split() for r in GUIDE_REFERENCES], GUIDE_HYPOTHESIS.split()), abs=TOL
    )
    # nltk doctest: no match at all → 0.0
    assert meteor(["non matching hypothesis"], ["this is a cat"]) == 0.0
    assert meteor(CORPUS_PREDICTIONS, CORPUS_REFERENCES) == pytest.approx(EVALUATE_CORPUS["meteor"], abs=TOL)
    multi = [[ref, "Nothing abnormal."] for ref in CORPUS_REFERENCES]
    assert meteor(CORPUS_PREDICTIONS, multi) == pytest.approx(EVALUATE_MULTI["meteor"], abs=TOL)


@pytest.mark.parametrize("seed", range(2))
def test_meteor_matches_nltk_directly(nltk_data, seed):
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    predictions = random_sentences(seed, 8)
    references = [random_sentences(50 * seed + i, 1 + i % 2) for i in range(8)]
    expected = [
        meteor_score([word_tokenize(r) for r in refs], word_tokenize(p), alpha=0.9, beta=3, gamma=0.5)
        for p, refs in zip(predictions, references, strict=True)
    ]
    assert meteor(predictions, references) == pytest.approx(sum(expected) / len(expected), abs=TOL)


def test_meteor_uses_wordnet_synonyms(nltk_data):
    # "sick" / "ill" share a WordNet synset: without WordNet this pair scores 0.7361 (docs/metrics.md)
    assert meteor(["the patient is sick"], ["the patient is ill"]) == pytest.approx(0.9921875, abs=TOL)


def test_meteor_without_nltk_data_says_how_to_get_it(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError, match=r"corpora/wordnet.*python -m nltk\.downloader wordnet punkt_tab"):
        meteor(["a"], ["a"])


# ---------------------------------------------------------------------------------------------------------------
# Closed questions
# ---------------------------------------------------------------------------------------------------------------


def test_normalized_accuracy_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  Left-Lung. ") == "left lung"
    predictions = ["Left lung.", "YES", "right  kidney", "no", "Ｃｏｒｏｎａｌ"]
    references = ["left lung", ["yes", "present"], "left kidney", "No!", "coronal"]
    assert closed_accuracy(predictions, references) == pytest.approx(4 / 5)


def test_m3d_substring_rule_is_their_rule():
    # eval_vqa.py: `if answer_choice[0] + '.' in generated_texts[0]`
    predictions = ["B. Axial", "The answer is B.", "B", "b. axial", "A. Coronal", "A. Coronal B. Axial"]
    assert [closed_accuracy([p], ["B"], rule="m3d_substring") for p in predictions] == [1, 1, 0, 0, 0, 1]
    assert closed_accuracy(predictions, ["B"] * 6, rule="m3d_substring") == pytest.approx(3 / 6)


# ---------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------


def test_m3d_protocol_reproduces_their_evaluation_loop(nltk_data):
    scores = compute_metrics(CORPUS_PREDICTIONS, CORPUS_REFERENCES, protocol="m3d")
    assert set(scores) == set(M3D_EXPECTED)
    for name, expected in M3D_EXPECTED.items():
        assert scores[name] == pytest.approx(expected, abs=TOL), name
    # per sample, then averaged: not the corpus BLEU-1 of the whole list
    pairs = zip(CORPUS_PREDICTIONS, CORPUS_REFERENCES, strict=True)
    per_sample = [bleu([p.strip()], [r.strip()], max_order=1) for p, r in pairs]
    assert per_sample == pytest.approx(M3D_PER_SAMPLE_BLEU1, abs=TOL)
    assert abs(bleu(CORPUS_PREDICTIONS, CORPUS_REFERENCES, max_order=1) - scores["bleu1"]) > 1e-3


def test_paper_protocol(nltk_data):
    scores = compute_metrics(CORPUS_PREDICTIONS, CORPUS_REFERENCES, protocol="paper")
    assert scores == pytest.approx(EVALUATE_CORPUS, abs=TOL)
    closed = compute_metrics(["Left lung.", "B"], ["left lung", "right lung"], task="closed")
    assert closed == {"accuracy": 0.5}
    assert compute_metrics(["B. x", "B"], ["B", "B"], protocol="m3d", task="closed") == {"accuracy": 0.5}


def test_scores_lie_in_the_unit_interval(nltk_data):
    for seed in range(3):
        predictions, references = random_sentences(seed, 6, 6), random_sentences(seed + 7, 6, 6)
        for protocol in ("paper", "m3d"):
            for value in compute_metrics(predictions, references, protocol=protocol).values():
                assert 0.0 <= value <= 1.0 and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [bleu, rouge, closed_accuracy, lambda p, r: compute_metrics(p, r, task="closed")])
@pytest.mark.parametrize(
    ("predictions", "references", "error", "message"),
    [
        ([], [], ValueError, "predictions is empty"),
        (["a", "b"], ["a"], ValueError, "2 predictions but 1 references"),
        (["a", None], ["a", "b"], TypeError, r"predictions\[1\] is a NoneType"),
        (["a", 3], ["a", "b"], TypeError, r"predictions\[1\] is a int"),
        (["a"], [["a", 1.5]], TypeError, r"references\[0\]\[1\] is a float"),
        (["a"], [[]], ValueError, r"references\[0\] is an empty list"),
        ("a b", ["a b"], TypeError, "predictions must be a list of strings, got str"),
        (["a"], "a", TypeError, "references must be a list of strings, got str"),
    ],
    ids=["empty", "lengths", "none", "int", "ref_float", "no_refs", "str_predictions", "str_references"],
)
def test_bad_input_gives_clear_errors(metric, predictions, references, error, message):
    with pytest.raises(error, match=message):
        metric(predictions, references)


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="protocol must be one of"):
        compute_metrics(["a"], ["a"], protocol="m3dvlm")
    with pytest.raises(ValueError, match="task must be"):
        compute_metrics(["a"], ["a"], task="report")
    with pytest.raises(ValueError, match="rule must be one of"):
        closed_accuracy(["a"], ["a"], rule="exact")
    with pytest.raises(ValueError, match="rouge_type must be one of"):
        rouge(["a"], ["a"], rouge_type="rouge-l")
    with pytest.raises(ValueError, match="max_order must be a positive integer"):
        bleu(["a"], ["a"], max_order=0)


# ---------------------------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_import_neither_torch_nor_transformers():
    code = textwrap.dedent("""
        import json, sys
        from med3dqwen import bleu, closed_accuracy, compute_metrics, meteor, rouge
        import med3dqwen.evaluation
        assert bleu(["a b c d"], ["a b c d"]) == 1.0 and rouge(["a"], ["a"]) == 1.0
        print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
