import json

import pytest

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.data.rewrite import (
    YES_NO_LABELS,
    RewriteConfig,
    RewrittenQA,
    build_record,
    closed_label,
    closed_label_names,
    parse_vision_content,
    rewrite_answer,
    rewrite_qa,
    rewrite_question,
    system_prompt,
    vision_content,
)
from med3dqwen.data.schema import CLOSED_LABEL_NAMES, RECORD_FIELDS, record_fields, to_format
from med3dqwen.io import read_jsonl, write_jsonl


RED_SYSTEM_PROMPT = (
    "You are a vision-language model that receives (1) a 3-D CT volume in NIfTI format and (2) a red, "
    "one-pixel-wide boundary that tightly encloses the ROI. Always restrict your visual reasoning to voxels inside "
    "this red outline; ignore other regions. When multiple structures appear inside the outline, describe only those "
    'explicitly requested. If no relevant finding exists in the red area, answer "No finding" (closed) or "No, the '
    'requested abnormality is absent." (open). Provide concise, radiologically precise answers.'
)

WH = "Within the {}-outlined area of the CT volume, "
OTHER = "Inside the {} boundary, "

# (question, body after the prefix, no-prompt rewrite, is a wh-question)
QUESTION_CASES = [
    (
        "What abnormalities are seen in the windpipe?",
        "what abnormalities are seen in the trachea?",
        "What abnormalities are seen in the trachea?",
        True,
    ),
    ("where is the nodule located?", "where is the nodule located?", "where is the nodule located?", True),
    (
        "How large is the lesion in the right lung upper lobe?",
        "how large is the lesion in the upper lobe of right lung?",
        "How large is the lesion in the upper lobe of right lung?",
        True,
    ),
    ("   Which lobe contains the mass?  ", "which lobe contains the mass?", "Which lobe contains the mass?", True),
    ("Whose scan is this?", "whose scan is this?", "Whose scan is this?", True),
    ("What's in the gullet?", "what's in the esophagus?", "What's in the esophagus?", True),
    ("Is there a pleural effusion?", "is there a pleural effusion?", "Is there a pleural effusion?", False),
    (
        "Can emphysema be identified in the left lung lower lobe?",
        "can emphysema be identified in the lower lobe of left lung?",
        "Can emphysema be identified in the lower lobe of left lung?",
        False,
    ),
    ("Are the lymph glands enlarged?", "are the lymph nodes enlarged?", "Are the lymph nodes enlarged?", False),
    (
        "Does the gullet show wall thickening?",
        "does the esophagus show wall thickening?",
        "Does the esophagus show wall thickening?",
        False,
    ),
    ("Whether the spine is fractured?", "whether the vertebral column is fractured?", None, False),
    ("CT shows a mass in the breastbone?", "CT shows a mass in the sternum?", None, False),
    ("CT-guided biopsy needed?", "CT-guided biopsy needed?", None, False),
    ("T7 fracture present?", "T7 fracture present?", None, False),
    ("A nodule in the RUL?", "a nodule in the RUL?", None, False),
]


@pytest.mark.parametrize("color", ["red", "blue"])
@pytest.mark.parametrize(("question", "body", "no_prompt", "is_wh"), QUESTION_CASES)
def test_rewrite_question(question, body, no_prompt, is_wh, color):
    prefix = (WH if is_wh else OTHER).format(color)
    assert rewrite_question(question, RewriteConfig(color=color)) == prefix + body
    if no_prompt is not None:
        assert rewrite_question(question, RewriteConfig(color=color, prompt=False)) == no_prompt


def test_rewrite_question_exact_strings():
    assert (
        rewrite_question("What abnormalities are seen in the windpipe?")
        == "Within the red-outlined area of the CT volume, what abnormalities are seen in the trachea?"
    )
    assert (
        rewrite_question("Is there a pleural effusion?", RewriteConfig(color="blue"))
        == "Inside the blue boundary, is there a pleural effusion?"
    )


@pytest.mark.parametrize(
    ("question", "expected_red", "expected_blue", "expected_no_prompt"),
    [
        (
            "Within the red-outlined area of the CT volume, what is seen?",
            "Within the red-outlined area of the CT volume, what is seen?",
            "Within the blue-outlined area of the CT volume, what is seen?",
            "What is seen?",
        ),
        (
            "inside the blue boundary is the heart enlarged?",
            "Inside the red boundary, is the heart enlarged?",
            "Inside the blue boundary, is the heart enlarged?",
            "Is the heart enlarged?",
        ),
    ],
)
def test_already_prefixed_question_is_not_prefixed_twice(question, expected_red, expected_blue, expected_no_prompt):
    assert rewrite_question(question) == expected_red
    assert rewrite_question(question, RewriteConfig(color="blue")) == expected_blue
    assert rewrite_question(question, RewriteConfig(prompt=False)) == expected_no_prompt
    assert rewrite_question(rewrite_question(question)) == expected_red


@pytest.mark.parametrize("question", [case[0] for case in QUESTION_CASES])
def test_normalising_before_or_after_prefixing_is_the_same(question):
    normalizer = RadLexNormalizer()
    prefixed_first = normalizer.normalize_text(rewrite_question(question, RewriteConfig(normalize_anatomy=False)))
    normalized_first = rewrite_question(normalizer.normalize_text(question), RewriteConfig(normalize_anatomy=False))
    assert prefixed_first == normalized_first == rewrite_question(question)


def test_normalisation_can_be_disabled():
    config = RewriteConfig(normalize_anatomy=False)
    assert rewrite_question("Is the windpipe patent?", config) == "Inside the red boundary, is the windpipe patent?"


def test_shared_normalizer_collects_counts():
    normalizer = RadLexNormalizer()
    rewrite_qa("Is the windpipe patent?", "Yes.", answer_type="closed", normalizer=normalizer)
    rewrite_qa("What is in the gullet?", "A mass in the gullet.", answer_type="open", normalizer=normalizer)
    assert normalizer.stats()["replaced"] == 3


@pytest.mark.parametrize("question", ["", "   ", "Inside the red boundary, "])
def test_empty_question_raises(question):
    with pytest.raises(ValueError, match="empty"):
        rewrite_qa(question, "Yes.", answer_type="closed")


@pytest.mark.parametrize(("answer", "label"), [("Yes.", 1), ("No.", 0), ("yes", 1), ("No", 0), (" YES. ", 1)])
def test_yes_no_closed_label(answer, label):
    qa = rewrite_qa("Is there an effusion?", answer, answer_type="closed")
    assert qa.closed_label == label
    assert qa.answer == answer.strip()
    assert (qa.closed_answer, qa.closed_choices) == (("no", "yes")[label], ("no", "yes"))


@pytest.mark.parametrize(
    ("answer", "choices", "label"),
    [
        ("A", ["A. left lung", "B. right lung", "C. both lungs"], 0),
        ("B.", ["A. left lung", "B. right lung", "C. both lungs"], 1),
        ("c", ["A. left lung", "B. right lung", "C. both lungs"], 2),
        ("B. right lung", ["A. left lung", "B. right lung", "C. both lungs"], 1),
        ("B: Right lung", ["A. left lung", "B. right lung", "C. both lungs"], 1),
        ("right lung", ["A. left lung", "B. right lung", "C. both lungs"], 1),
        ("(B)", ["left lung", "right lung"], 1),
        ("B. right lung", ["left lung", "right lung"], 1),
        ("moderate", ["none", "mild", "moderate", "severe"], 2),
        ("Severe.", ["none", "mild", "moderate", "severe"], 3),
    ],
)
def test_choice_closed_label(answer, choices, label):
    assert closed_label(answer, choices) == label
    qa = rewrite_qa("Which lung is affected?", answer, answer_type="closed", choices=choices)
    assert (qa.answer, qa.closed_label) == (answer.strip(), label)
    letters = ("A", "B", "C", "D")[: len(choices)]  # any set but yes/no is named by its letters
    assert (qa.closed_answer, qa.closed_choices) == (letters[label], letters)


@pytest.mark.parametrize(
    ("choices", "names"),
    [
        (None, ("no", "yes")),
        (["No.", "Yes."], ("no", "yes")),
        ([" YES ", "no"], ("yes", "no")),  # a yes/no set in another order keeps its names: the head sees names
        (["A. left lung", "B. right lung"], ("A", "B")),
        (["(a) left lung", "b) right lung", "C: both"], ("A", "B", "C")),
        (["none", "mild", "moderate", "severe"], ("A", "B", "C", "D")),
    ],
)
def test_closed_label_names(choices, names):
    assert closed_label_names(choices) == names
    assert set(names) <= set(CLOSED_LABEL_NAMES)


def test_reversed_yes_no_set_names_the_answer_not_the_index():
    qa = rewrite_qa("Is there an effusion?", "Yes.", answer_type="closed", choices=["Yes.", "No."])
    assert (qa.closed_label, qa.closed_answer, qa.closed_choices) == (0, "yes", ("yes", "no"))


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        (["A. one", "C. two"], "lettered 'C' at B"),
        (["one", "two", "three", "four", "five"], "5 choices"),
        ([], "0 choices"),
    ],
)
def test_label_sets_the_vocabulary_cannot_name(choices, message):
    with pytest.raises(ValueError, match=message) as info:
        closed_label_names(choices)
    assert repr(tuple(choices)) in str(info.value)


def test_offered_choices_restrict_the_closed_choices():
    labels = ["A. cyst", "B. mass", "C. NA", "D. abscess"]
    qa = rewrite_qa("What is seen?", "D. abscess", answer_type="closed", choices=labels, offered=["A", "B", "D"])
    assert (qa.closed_label, qa.closed_answer, qa.closed_choices) == (3, "D", ("A", "B", "D"))
    with pytest.raises(ValueError, match=r"'D'\) is not among the offered choices \('A', 'B'\)"):
        rewrite_qa("What is seen?", "D. abscess", answer_type="closed", choices=labels, offered=["A", "B"])
    with pytest.raises(ValueError, match=r"offered choices \['E'\] are not names"):
        rewrite_qa("What is seen?", "A", answer_type="closed", choices=labels, offered=["A", "E"])
    opened = rewrite_qa("What is seen?", "A cyst.", answer_type="open", choices=labels, offered=["A"])
    assert (opened.closed_label, opened.closed_answer, opened.closed_choices) == (-1, None, ())


@pytest.mark.parametrize(
    ("answer_type", "label", "answer", "choices", "message"),
    [
        ("closed", 1, None, ("no", "yes"), "closed_answer None is not one of"),
        ("closed", 1, "maybe", ("no", "maybe"), r"\['maybe'\] are not"),
        ("closed", 0, "no", ("no", "no"), "distinct"),
        ("closed", -1, "no", ("no", "yes"), "does not fit a 'closed' answer"),
        ("open", 0, None, (), "does not fit a 'open' answer"),
        ("open", -1, "yes", ("no", "yes"), "an open answer has no closed_answer"),
    ],
)
def test_rewritten_qa_checks_its_closed_fields(answer_type, label, answer, choices, message):
    with pytest.raises(ValueError, match=message):
        RewrittenQA("Q?", "A.", answer_type, label, answer, choices, "system", "red")


@pytest.mark.parametrize(
    ("answer", "choices"),
    [
        ("Maybe", None),
        ("A", None),
        ("No finding", None),
        ("E", ["A. left lung", "B. right lung"]),
        ("B. left lung", ["A. left lung", "B. right lung"]),
        ("extreme", ["mild", "moderate", "severe"]),
    ],
)
def test_unknown_closed_answer_raises(answer, choices):
    with pytest.raises(ValueError, match="not in the label set") as info:
        rewrite_qa("Is there an effusion?", answer, answer_type="closed", choices=choices)
    assert repr(answer) in str(info.value)
    assert repr(tuple(choices or YES_NO_LABELS)) in str(info.value)


def test_closed_answer_is_not_normalised():
    choices = ["windpipe", "gullet"]
    qa = rewrite_qa("Which organ is outlined?", "gullet", answer_type="closed", choices=choices)
    assert (qa.answer, qa.closed_label) == ("gullet", 1)


@pytest.mark.parametrize(
    ("answer", "red", "blue", "no_prompt"),
    [
        (
            "Nodule in the right lung upper lobe.",
            "Within the red boundary, nodule in the upper lobe of right lung.",
            "Within the blue boundary, nodule in the upper lobe of right lung.",
            "Nodule in the upper lobe of right lung.",
        ),
        (
            "CT shows no findings.",
            "Within the red boundary, CT shows no findings.",
            "Within the blue boundary, CT shows no findings.",
            "CT shows no findings.",
        ),
        (
            "Within the red boundary, a mass.",
            "Within the red boundary, a mass.",
            "Within the blue boundary, a mass.",
            "A mass.",
        ),
    ],
)
def test_open_answer(answer, red, blue, no_prompt):
    qa = rewrite_qa("What is seen?", answer, answer_type="open")
    assert (qa.answer, qa.closed_label, qa.answer_type) == (red, -1, "open")
    assert rewrite_answer(answer, "open", RewriteConfig(color="blue")) == blue
    assert rewrite_answer(answer, "open", RewriteConfig(prompt=False)) == no_prompt


def test_no_prompt_variant_keeps_labels_and_normalisation():
    config = RewriteConfig(prompt=False)
    closed = rewrite_qa("Is the windpipe patent?", "Yes.", answer_type="closed", config=config)
    assert closed == RewrittenQA(
        question="Is the trachea patent?",
        answer="Yes.",
        answer_type="closed",
        closed_label=1,
        closed_answer="yes",
        closed_choices=("no", "yes"),
        system=system_prompt(prompt=False),
        boundary_prompt="none",
    )
    opened = rewrite_qa("Where is the mass?", "In the gullet.", answer_type="open", config=config)
    assert (opened.question, opened.answer, opened.closed_label) == ("Where is the mass?", "In the esophagus.", -1)
    blue = rewrite_qa("Is it there?", "No.", answer_type="closed", config=RewriteConfig(color="blue"))
    assert (blue.boundary_prompt, opened.boundary_prompt) == ("blue", "none")
    with pytest.raises(ValueError, match="prompt=False"):
        RewriteConfig(color="None")


def test_invalid_answer_type_and_empty_answer():
    with pytest.raises(ValueError, match="answer_type"):
        rewrite_qa("Is there a mass?", "Yes.", answer_type="binary")
    with pytest.raises(ValueError, match="answer is empty"):
        rewrite_qa("What is seen?", " ", answer_type="open")


def test_system_prompt_red_is_verbatim():
    assert system_prompt() == RED_SYSTEM_PROMPT
    assert system_prompt("red", prompt=True) == RED_SYSTEM_PROMPT
    assert rewrite_qa("Is there a mass?", "No.", answer_type="closed").system == RED_SYSTEM_PROMPT


def test_system_prompt_colour_word():
    blue = system_prompt("blue")
    assert blue == RED_SYSTEM_PROMPT.replace("red", "blue")
    assert "red" not in blue and blue.count("blue") == 3
    assert "(2) an orange, one-pixel-wide boundary" in system_prompt("orange")
    with pytest.raises(ValueError, match="colour"):
        system_prompt(" ")
    with pytest.raises(ValueError, match="colour"):
        RewriteConfig(color="")


def test_system_prompt_without_outline():
    text = system_prompt(prompt=False)
    assert text == system_prompt("blue", prompt=False)
    for word in ("outline", "boundary", "red", "ROI", "(2)"):
        assert word not in text
    assert text == (
        "You are a vision-language model that receives a 3-D CT volume in NIfTI format. When multiple structures "
        'appear in the volume, describe only those explicitly requested. If no relevant finding exists, answer "No '
        'finding" (closed) or "No, the requested abnormality is absent." (open). Provide concise, radiologically '
        "precise answers."
    )


@pytest.mark.parametrize(
    ("volume", "pngs", "content"),
    [
        ("a/vol.nii.gz", ["p/0.png", "p/1.png"], "nifti:a/vol.nii.gz; prompt_png:[p/0.png, p/1.png]"),
        ("my dir/vol.nii.gz", ["one.png"], "nifti:my dir/vol.nii.gz; prompt_png:[one.png]"),
        ("vol.nii", [], "nifti:vol.nii; prompt_png:[]"),
    ],
)
def test_vision_content_round_trip(volume, pngs, content):
    assert vision_content(volume, pngs) == content
    assert parse_vision_content(content) == (volume, pngs)


@pytest.mark.parametrize(
    ("volume", "pngs"), [("", []), ("a; prompt_png:[b", []), ("v.nii", ["a, b.png"]), ("v.nii", ["x]"])]
)
def test_vision_content_rejects_unparseable_paths(volume, pngs):
    with pytest.raises(ValueError):
        vision_content(volume, pngs)


@pytest.mark.parametrize("content", ["vol.nii; prompt_png:[]", "nifti:vol.nii", "nifti:vol.nii; prompt_png:[a.png"])
def test_parse_vision_content_rejects_other_strings(content):
    with pytest.raises(ValueError, match="nifti"):
        parse_vision_content(content)


def _record(**overrides):
    qa = rewrite_qa("Is there a nodule in the windpipe?", "Yes.", answer_type="closed")
    kwargs = dict(
        volume_path="vols/train_1_a_1.nii.gz",
        mask_path="masks/trachea.nii.gz",
        mask_source="dataset",
        roi="trachea and bronchi/trachea",
        question_type="presence",
        split="train",
        patient_id="train_1",
        volume_id="train_1_a_1",
        prompt_pngs=["png/0.png", "png/1.png"],
    )
    kwargs.update(overrides)
    return build_record(qa, **kwargs)


def test_build_record():
    record = _record(extra={"finding": "nodule"})
    assert list(record) == [*record_fields("trl"), "finding"]
    assert record["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": RED_SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Inside the red boundary, is there a nodule in the trachea?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    assert record["prompt_pngs"] == ["png/0.png", "png/1.png"]
    assert {field: record[field] for field in RECORD_FIELDS} == {
        "volume_path": "vols/train_1_a_1.nii.gz",
        "mask_path": "masks/trachea.nii.gz",
        "mask_source": "dataset",
        "roi": "trachea and bronchi/trachea",
        "question_type": "presence",
        "answer_type": "closed",
        "closed_label": 1,
        "closed_answer": "yes",
        "closed_choices": ["no", "yes"],
        "split": "train",
        "patient_id": "train_1",
        "volume_id": "train_1_a_1",
        "roi_empty": False,
        "boundary_prompt": "red",
    }
    assert json.loads(json.dumps(record)) == record


def test_build_record_whole_volume_question():
    record = _record(mask_path=None, mask_source=None, roi=None, prompt_pngs=[], roi_empty=True)
    assert (record["mask_path"], record["mask_source"], record["roi"], record["roi_empty"]) == (None, None, None, True)
    assert record["prompt_pngs"] == [] and record["volume_path"] == "vols/train_1_a_1.nii.gz"
    assert to_format(record, "paper")["messages"][2]["content"] == "nifti:vols/train_1_a_1.nii.gz; prompt_png:[]"


def test_build_record_rejects_paths_the_paper_layout_cannot_hold():
    with pytest.raises(ValueError, match="prompt PNG path"):
        _record(prompt_pngs=["a, b.png"])


def test_build_record_rejects_clashing_extra():
    with pytest.raises(ValueError, match="split"):
        _record(extra={"split": "test"})


def test_jsonl_round_trip(tmp_path):
    records = [_record(), _record(split="test", extra={"note": "ünïcode"})]
    path = tmp_path / "sub" / "train.jsonl"
    assert write_jsonl(path, records) == 2
    assert read_jsonl(path) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"old": true}\n', encoding="utf-8")

    def failing_records():
        yield _record()
        yield _record()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl(path, failing_records())
    assert path.read_text(encoding="utf-8") == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


@pytest.mark.parametrize(("bad_line", "message"), [('{"a": 1', "malformed JSON"), ("[1, 2]", "JSON object")])
def test_read_jsonl_names_the_bad_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"a": 1}}\n\n{{"b": 2}}\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert "line 4" in str(info.value) and "bad.jsonl" in str(info.value)
