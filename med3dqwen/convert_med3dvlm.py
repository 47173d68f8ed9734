"""Convert Med3DVLM / DCFormer_SigLIP checkpoints into our vision-encoder (and projector) state dicts.

Usage (``med3dqwen-convert-med3dvlm`` is the same program, installed with the package)::

    # DCFormer encoder from the contrastive (SigLIP) stage, for any decoder size
    python -m med3dqwen.convert_med3dvlm --checkpoint path/to/DCFormer_SigLIP --output_dir converted/

    # encoder + projector of the 7B VLM (the projector only fits hidden size 3584, Qwen2.5-7B)
    python -m med3dqwen.convert_med3dvlm --checkpoint path/to/Med3DVLM-Qwen-2.5-7B \\
        --output_dir converted/ --hidden_size 3584

The converted encoder has Med3DVLM's one input channel; the ``channel`` prompt encoding adds its contour channel
through the model's zero-initialised ``PromptStem`` (``prompt_channels=1``), so the same weights serve every encoding.

``--checkpoint`` is a ``.bin`` / ``.pt`` (loaded with ``weights_only=True``), a ``.safetensors`` file, or a folder
with ``model.safetensors(.index.json)`` / ``pytorch_model.bin(.index.json)``; sharded safetensors are read lazily,
so only the vision / projector tensors of a 7B checkpoint are loaded. Writes ``vision_encoder.safetensors``,
``projector.safetensors`` (when converted) and ``conversion_report.json`` (every missing, unexpected and ignored
key). Exits with status 1, writing only the report, if encoder or projector keys are missing (``--allow_missing``
writes the partial weights anyway).

Key layouts recognised (Med3DVLM ``src/model/vlm_arch.py``, ``src/model/llm/qwen.py``, ``src/model/CLIP.py``):

- ``med3dvlm_vlm``: ``VLMQwenForCausalLM`` — ``model.vision_tower.vision_tower.encoder.*`` (``VisionTower`` wraps
  ``DecompModel``), projector ``model.mm_projector.*``, Qwen2 keys ``model.embed_tokens`` / ``model.layers`` /
  ``model.norm`` / ``lm_head`` (ignored). Also without the ``model.`` root and under PEFT's ``base_model.model.``.
- ``dcformer_siglip``: ``DEC_CLIP`` — ``vision_encoder.encoder.*``; ``language_encoder.*`` (ClinicalBERT),
  ``mm_vision_proj``, ``mm_language_proj``, ``t_prime``, ``bias``, ``logit_scale`` (ignored).
- ``dcformer_encoder``: a bare ``DecompModel`` state dict (``encoder.*``, their ``pretrained_ViT.bin``) or a
  ``VisionTower`` one (``vision_tower.encoder.*``, their ``vision_tower.bin``).

Med3DVLM renamed the conv blocks' layer scale ``gamma`` → ``scale`` (commit 32f92ea); ``gamma`` keys are
accepted and listed in ``renamed_keys``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from med3dqwen.io import atomic_output
from med3dqwen.modeling.dcformer_med3d_qwen import DCFORMER_PRESETS, Med3DQwenVisionEncoder
from med3dqwen.modeling.projector_med3d_qwen import Med3DQwenMultiModalProjector


__all__ = ["ConversionResult", "convert_med3dvlm_checkpoint", "load_checkpoint_state_dict", "main"]

ENCODER_FILE = "vision_encoder.safetensors"
PROJECTOR_FILE = "projector.safetensors"
REPORT_FILE = "conversion_report.json"


@dataclass(frozen=True)
class _Layout:
    source: str
    encoder_prefix: str  # prefix in front of DecompModel's keys ("encoder.s0....")
    projector_prefix: str | None  # prefix in front of MixerLowHighHybridMLP's keys
    ignored: re.Pattern[str]  # recognised keys of other parts (decoder, text tower, contrastive heads)


# Qwen2 decoder keys of VLMQwenForCausalLM (also under PEFT's ``base_model.model.``; LoRA keys included).
_QWEN2_KEYS = re.compile(
    r"^(?:base_model\.model\.)?(?:(?:model\.)?(?:embed_tokens|layers\.\d+|norm|rotary_emb)\.|lm_head\.)"
)
_DEC_CLIP_KEYS = re.compile(r"^(?:language_encoder\.|mm_vision_proj\.|mm_language_proj\.|t_prime$|bias$|logit_scale$)")
_NOTHING = re.compile(r"(?!)")

# Most specific first: a key set is matched to the layout with the most ``<encoder_prefix>encoder.s`` keys.
_LAYOUTS = (
    _Layout("med3dvlm_vlm", "model.vision_tower.vision_tower.", "model.mm_projector.", _QWEN2_KEYS),
    _Layout(
        "med3dvlm_vlm",
        "base_model.model.model.vision_tower.vision_tower.",
        "base_model.model.model.mm_projector.",
        _QWEN2_KEYS,
    ),
    _Layout("med3dvlm_vlm", "vision_tower.vision_tower.", "mm_projector.", _QWEN2_KEYS),
    _Layout("dcformer_siglip", "vision_encoder.", None, _DEC_CLIP_KEYS),
    _Layout("dcformer_encoder", "vision_tower.", None, _NOTHING),
    _Layout("dcformer_encoder", "", None, _NOTHING),
)
_OLD_LAYER_SCALE = re.compile(r"^(encoder\.s[1-4]\.\d+)\.gamma$")


@dataclass
class ConversionResult:
    """What :func:`convert_med3dvlm_checkpoint` found and produced.

    Attributes:
        encoder_state_dict: keys of :class:`Med3DQwenVisionEncoder` (``encoder.s0...``) → tensors.
        projector_state_dict: keys of :class:`Med3DQwenMultiModalProjector` → tensors, or None (see
            ``projector_note``).
        unexpected_keys: checkpoint keys that belong to no known part (full checkpoint names).
        missing_keys: expected encoder / projector keys absent from the checkpoint (full checkpoint names).
        source: ``"med3dvlm_vlm"``, ``"dcformer_siglip"`` or ``"dcformer_encoder"``.
        ignored_keys: recognised keys of parts we do not convert (decoder, text tower, an unconverted projector).
        renamed_keys: checkpoint key → our key where the name changed beyond the prefix (``gamma`` → ``scale``).
        projector_note: why the projector was or was not converted.
        encoder_prefix: the checkpoint prefix stripped from the encoder keys.
        projector_prefix: the checkpoint prefix of the projector keys (None for encoder-only layouts).
    """

    encoder_state_dict: dict[str, torch.Tensor]
    projector_state_dict: dict[str, torch.Tensor] | None
    unexpected_keys: list[str]
    missing_keys: list[str]
    source: str
    ignored_keys: list[str] = field(default_factory=list)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    projector_note: str = ""
    encoder_prefix: str = ""
    projector_prefix: str | None = None

    def to_report(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors)."""
        report = asdict(self)
        for name in ("encoder_state_dict", "projector_state_dict"):
            report.pop(name)
        report["num_encoder_tensors"] = len(self.encoder_state_dict)
        report["num_projector_tensors"] = len(self.projector_state_dict or {})
        report["num_ignored_keys"] = len(self.ignored_keys)
        return report


def _reference_shapes(module_factory) -> dict[str, torch.Size]:
    """State-dict shapes of a module built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = module_factory()
    return {k: v.shape for k, v in module.state_dict().items()}


def _detect_layout(keys: list[str]) -> _Layout:
    hits = [sum(k.startswith(f"{layout.encoder_prefix}encoder.s") for k in keys) for layout in _LAYOUTS]
    best = max(range(len(_LAYOUTS)), key=lambda i: (hits[i], -i))
    if hits[best] == 0:
        prefixes = sorted({f"{layout.encoder_prefix}encoder.s" for layout in _LAYOUTS})
        raise ValueError(f"no DCFormer encoder keys found (looked for {prefixes}); first keys: {keys[:5]}")
    return _LAYOUTS[best]


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Size) -> None:
    if tensor.shape != expected:
        raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, expected {tuple(expected)}")


def _projector_hidden_size(projector_keys: Mapping[str, str], state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """H of a Med3DVLM mixer projector: output size of the last low-stream layer's channel MLP (None if absent)."""
    layers = [int(m.group(1)) for k in projector_keys if (m := re.match(r"low_mixer\.(\d+)\.", k))]
    key = f"low_mixer.{max(layers)}.mlp2.mm_projector.0.weight" if layers else None
    return int(state_dict[projector_keys[key]].shape[0]) if key in projector_keys else None


def convert_med3dvlm_checkpoint(
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    hidden_size: int | None = None,
    preset: str = "decomp_small",
) -> ConversionResult:
    """Map a Med3DVLM / DCFormer_SigLIP state dict onto our encoder (and projector) key names.

    Args:
        state_dict: the checkpoint's state dict, or a path (see :func:`load_checkpoint_state_dict`). Tensors are
            not copied; a lazy mapping is only read for the keys kept.
        hidden_size: decoder hidden size for the projector; the checkpoint's projector is converted only when its
            hidden size equals this (Med3DVLM's release: 3584). None: do not convert the projector.
        preset: :data:`DCFORMER_PRESETS` entry giving the expected encoder shapes.

    Returns:
        A :class:`ConversionResult`; missing and unexpected keys are reported there, not raised.

    Raises:
        ValueError: if no encoder keys are found, a tensor's shape does not match (the message names the key
            and both shapes), or the preset is unknown.
    """
    if not isinstance(state_dict, Mapping):
        state_dict = load_checkpoint_state_dict(state_dict)
    if preset not in DCFORMER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(DCFORMER_PRESETS)}")
    keys = list(state_dict.keys())
    layout = _detect_layout(keys)
    enc_prefix, proj_prefix = layout.encoder_prefix, layout.projector_prefix
    enc_expected = _reference_shapes(lambda: Med3DQwenVisionEncoder(**DCFORMER_PRESETS[preset]))

    encoder: dict[str, torch.Tensor] = {}
    projector_raw: dict[str, str] = {}  # projector key → checkpoint key
    unexpected, ignored = [], []
    renamed: dict[str, str] = {}
    for key in keys:
        if key.startswith(enc_prefix) and key[len(enc_prefix) :].startswith("encoder."):
            ours = key[len(enc_prefix) :]
            if m := _OLD_LAYER_SCALE.match(ours):
                ours = f"{m.group(1)}.scale"
                renamed[key] = ours
            if ours in enc_expected:
                encoder[ours] = state_dict[key]
            else:
                unexpected.append(key)
        elif proj_prefix is not None and key.startswith(proj_prefix):
            projector_raw[key[len(proj_prefix) :]] = key
        elif layout.ignored.search(key):
            ignored.append(key)
        else:
            unexpected.append(key)

    for ours, tensor in encoder.items():
        _check_shape(enc_prefix + ours, tensor, enc_expected[ours])
    missing = [enc_prefix + k for k in enc_expected if k not in encoder]

    projector, note = None, ""
    if not projector_raw:
        note = "the checkpoint holds no projector"
    else:
        ckpt_h = _projector_hidden_size(projector_raw, state_dict)
        if hidden_size is None:
            note = f"hidden_size not given; the checkpoint's projector (hidden size {ckpt_h}) was not converted"
        elif ckpt_h != hidden_size:
            note = (
                f"the checkpoint's projector is for hidden size {ckpt_h}, not {hidden_size}: not converted "
                "(train the projector for this decoder in the alignment stage)"
            )
        if note:
            ignored.extend(projector_raw.values())
        else:
            proj_expected = _reference_shapes(lambda: Med3DQwenMultiModalProjector(hidden_size))
            projector = {}
            for ours, key in projector_raw.items():
                if ours in proj_expected:
                    projector[ours] = state_dict[key]
                    _check_shape(key, projector[ours], proj_expected[ours])
                else:
                    unexpected.append(key)
            missing += [proj_prefix + k for k in proj_expected if k not in projector]
            note = f"converted (hidden size {hidden_size})"

    return ConversionResult(
        encoder_state_dict=encoder,
        projector_state_dict=projector,
        unexpected_keys=unexpected,
        missing_keys=missing,
        source=layout.source,
        ignored_keys=ignored,
        renamed_keys=renamed,
        projector_note=note,
        encoder_prefix=enc_prefix,
        projector_prefix=proj_prefix,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------


class _LazySafetensors(Mapping):
    """Read-only mapping over one or more safetensors files; a tensor is read only when accessed."""

    def __init__(self, key_to_file: Mapping[str, Path]):
        self._key_to_file = dict(key_to_file)
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._key_to_file[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __len__(self) -> int:
        return len(self._key_to_file)


def _safetensors_keys(files: list[Path]) -> _LazySafetensors:
    from safetensors import safe_open

    key_to_file = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            key_to_file.update(dict.fromkeys(f.keys(), path))
    return _LazySafetensors(key_to_file)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a flat state dict (name → tensor)")
    return dict(state_dict)


def _index_shards(index_path: Path) -> list[Path]:
    weight_map = json.loads(index_path.read_text())["weight_map"]
    return [index_path.parent / name for name in sorted(set(weight_map.values()))]


def load_checkpoint_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Open a checkpoint as a name → tensor mapping.

    Args:
        path: a ``.bin`` / ``.pt`` / ``.pth`` file (``torch.load(weights_only=True)``), a ``.safetensors`` file, or a
            folder holding ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
            ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, searched in that order. Safetensors are
            read lazily.

    Raises:
        FileNotFoundError: if the path or the folder's weights are missing.
        ValueError: if a file is not a flat state dict or has an unknown suffix.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json"):
            candidate = path / name
            if not candidate.is_file():
                continue
            if name == "model.safetensors.index.json":
                return _safetensors_keys(_index_shards(candidate))
            if name == "model.safetensors":
                return _safetensors_keys([candidate])
            merged: dict[str, torch.Tensor] = {}
            for shard in _index_shards(candidate):
                merged.update(_torch_load(shard))
            return merged
        if (path / "pytorch_model.bin").is_file():
            return _torch_load(path / "pytorch_model.bin")
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _safetensors_keys([path])
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_load(path)
    raise ValueError(f"unknown checkpoint format {path.suffix!r} for {path}: use .bin, .pt, .pth or .safetensors")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or folder")
    parser.add_argument("--output_dir", required=True, help="folder for the safetensors files and the report")
    parser.add_argument("--hidden_size", type=int, default=None, help="decoder hidden size for the projector")
    parser.add_argument("--preset", default="decomp_small", choices=sorted(DCFORMER_PRESETS))
    parser.add_argument("--allow_missing", action="store_true", help="write weights even if keys are missing")
    args = parser.parse_args(argv)

    result = convert_med3dvlm_checkpoint(args.checkpoint, hidden_size=args.hidden_size, preset=args.preset)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(args.checkpoint),
        "preset": args.preset,
        "encoder_config": dict(DCFORMER_PRESETS[args.preset]),
        "hidden_size": args.hidden_size,
        **result.to_report(),
        "files": [],
    }
    ok = not result.missing_keys or args.allow_missing
    if ok:
        meta = {"format": "pt", "source": result.source, "preset": args.preset}
        _write_safetensors(out / ENCODER_FILE, result.encoder_state_dict, meta)
        report["files"].append(ENCODER_FILE)
        if result.projector_state_dict is not None:
            meta = {"format": "pt", "source": result.source, "hidden_size": str(args.hidden_size)}
            _write_safetensors(out / PROJECTOR_FILE, result.projector_state_dict, meta)
            report["files"].append(PROJECTOR_FILE)
    _write_json(out / REPORT_FILE, report)

    summary = (
        f"{result.source}: {len(result.encoder_state_dict)} encoder tensors, projector: {result.projector_note}; "
        f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, "
        f"{len(result.ignored_keys)} ignored keys; report: {out / REPORT_FILE}"
    )
    print(summary, file=sys.stderr)
    if not ok:
        shown = ", ".join(result.missing_keys[:10])
        print(f"missing keys, no weights written (--allow_missing to write them): {shown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
