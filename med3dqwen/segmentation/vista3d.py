"""VISTA-3D (MONAI) as a mask source: class prompts → masks on the CT volume's own grid.

Runs the MONAI code path of the ``vista3d`` bundle's ``configs/inference.json`` for automatic segmentation with class
prompts (pre-processing, sliding-window inference, post-processing inverted back to the input grid). It needs the
released weights (a ``vista3d`` bundle folder) or a ready network; a network with random weights (pipeline checks
only: its masks are meaningless) is built only when asked for with ``random_weights=True``. The pipeline step by step,
what was verified and how to get the weights: ``docs/segmentation.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from med3dqwen.anatomy.labels import VISTA3D_EVERYTHING_LABELS, VISTA3D_LABELS, VISTA3D_SUBCLASS, VISTA3D_SUPPORTED
from med3dqwen.anatomy.vocabulary import Vocabulary, default_vocabulary, name_key
from med3dqwen.processing.ct_io import CorruptFileError, CTVolume

from .base import MaskResult, MaskSource, UnknownStructureError, close_matches


__all__ = [
    "VISTA3D_BUNDLE_DEFAULTS",
    "VISTA3D_EVERYTHING_LABELS",
    "VISTA3D_LABELS",
    "VISTA3D_SUBCLASS",
    "VISTA3D_SUPPORTED",
    "Vista3DSource",
]

VISTA3D_BUNDLE_DEFAULTS: dict = {
    "resample_spacing": (1.5, 1.5, 1.5),
    "patch_size": (128, 128, 128),
    "overlap": 0.3,
    "padding_mode": "replicate",
    "sw_batch_size": 1,
    "crop_margin": 10,
    "intensity_range": (-963.8247715525971, 1053.678477684517),
}
"""Settings of the ``vista3d`` bundle's ``configs/inference.json`` (used when a bundle does not override them)."""


class Vista3DSource(MaskSource):
    """Masks from MONAI's VISTA-3D with class prompts, on the input volume's grid.

    Args:
        bundle_dir: a downloaded ``vista3d`` bundle (``models/model.pt``; ``configs/inference.json`` and
            ``configs/metadata.json`` are read when present for the settings below and the label dictionary).
            Download it with ``monai.bundle.download("vista3d", bundle_dir=...)`` on a machine with internet.
        network: a ready VISTA-3D module (same ``forward`` as ``monai.networks.nets.VISTA3D``) instead of building
            ``vista3d132``; weights from ``bundle_dir`` are still loaded into it when given.
        random_weights: build ``vista3d132`` with random weights when neither ``bundle_dir`` nor ``network`` is given
            (pipeline checks only: the masks are meaningless). Must be asked for: without it, a source with neither
            is an error.
        device: where the network runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        encoder_embed_dim: width of ``vista3d132`` when it is built here (48 = the released model).
        resample_spacing: voxel size in mm the network sees (bundle: 1.5 mm isotropic).
        patch_size: sliding-window size (bundle: 128³).
        overlap: sliding-window overlap.
        padding_mode: padding of windows at the volume border.
        sw_batch_size: windows per forward pass.
        crop_margin: margin in voxels of the foreground crop.
        intensity_range: HU range scaled to [0, 1].
        amp: run under autocast on CUDA (the bundle does); ignored on CPU.
        vocabulary: name lookup (default: the shared one).

    Settings left ``None`` come from the bundle's ``inference.json`` (plain values only; ``$`` expressions are not
    evaluated) and otherwise from :data:`VISTA3D_BUNDLE_DEFAULTS`.

    Raises:
        CorruptFileError: ``bundle_dir`` missing, without ``models/model.pt``, or with weights that do not fit.
        ValueError: neither ``bundle_dir``, ``network`` nor ``random_weights=True`` (the message says how to get the
            bundle), or ``random_weights=True`` together with ``bundle_dir`` or ``network``.
    """

    source_name = "vista3d"

    def __init__(
        self,
        bundle_dir: str | os.PathLike | None = None,
        network=None,
        device: str = "cpu",
        *,
        random_weights: bool = False,
        encoder_embed_dim: int = 48,
        resample_spacing: Sequence[float] | None = None,
        patch_size: Sequence[int] | None = None,
        overlap: float | None = None,
        padding_mode: str | None = None,
        sw_batch_size: int | None = None,
        crop_margin: int | None = None,
        intensity_range: tuple[float, float] | None = None,
        amp: bool = True,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        import torch

        if random_weights and (bundle_dir is not None or network is not None):
            given = "bundle_dir" if bundle_dir is not None else "network"
            raise ValueError(f"Vista3DSource: random_weights=True contradicts {given}=...; pass one or the other")
        if not random_weights and bundle_dir is None and network is None:
            raise ValueError(
                "Vista3DSource needs the released VISTA-3D weights: pass bundle_dir=<the vista3d bundle folder, "
                "holding models/model.pt> (download it on a machine with internet with "
                "monai.bundle.download('vista3d', bundle_dir=...); see docs/segmentation.md) or a ready network=...; "
                "random_weights=True builds a network with random weights, for pipeline checks only"
            )
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)
        bundle_settings, labels = ({}, None) if self.bundle_dir is None else _read_bundle(self.bundle_dir)
        explicit = {
            "resample_spacing": resample_spacing,
            "patch_size": patch_size,
            "overlap": overlap,
            "padding_mode": padding_mode,
            "sw_batch_size": sw_batch_size,
            "crop_margin": crop_margin,
            "intensity_range": intensity_range,
        }
        self.settings = {
            key: explicit[key] if explicit[key] is not None else bundle_settings.get(key, default)
            for key, default in VISTA3D_BUNDLE_DEFAULTS.items()
        }
        self.subclass = {**VISTA3D_SUBCLASS, **bundle_settings.get("subclass", {})}
        self.labels: dict[int, str] = labels or dict(VISTA3D_LABELS)
        self.vocabulary = vocabulary or default_vocabulary()
        self.device = torch.device(device)
        self.amp = bool(amp)

        built_here = network is None
        if built_here:
            from monai.networks.nets import vista3d132

            network = vista3d132(encoder_embed_dim=encoder_embed_dim)
        # True: bundle weights; False: random weights; None: a network passed in (its weights are the caller's).
        self.pretrained: bool | None = True if self.bundle_dir is not None else (False if built_here else None)
        if self.bundle_dir is not None:
            _load_weights(network, self.bundle_dir / "models" / "model.pt")
        self.network = network.to(self.device).eval()

    def __repr__(self) -> str:
        bundle = None if self.bundle_dir is None else str(self.bundle_dir)
        device = str(self.device)
        return f"{type(self).__name__}(bundle_dir={bundle!r}, device={device!r}, pretrained={self.pretrained})"

    # -- names -----------------------------------------------------------------------------------------------------

    def class_ids(self, structure: str) -> tuple[list[int], list[str]]:
        """The class prompts for a structure and the class names they stand for.

        ``"liver"`` → ``([1], ["liver"])``; ``"lung_left"`` → ``([28, 29], [...upper lobe, ...lower lobe])``;
        VISTA-3D names, TotalSegmentator / RadGenome / RadLex names and ``"id:<n>"`` are accepted.

        Raises:
            UnknownStructureError: no VISTA-3D class (or set of classes) for the name, or a class the bundle does not
                support as a prompt (16, 18, 129, 130, 131: they need point prompts, i.e. zero-shot).
        """
        by_name = {name_key(name): label for label, name in self.labels.items()}
        if structure.startswith("id:") and structure[3:].isdigit():
            ids = [int(structure[3:])]
            if ids[0] not in self.labels:
                raise UnknownStructureError(structure, self.source_name, detail="no such VISTA-3D class id")
        elif name_key(structure) in by_name:
            ids = [by_name[name_key(structure)]]
        else:
            names = self.vocabulary.components(structure, "vista3d")
            ids = [by_name[name_key(n)] for n in names if name_key(n) in by_name]
            if not names or len(ids) != len(names):
                raise UnknownStructureError(
                    structure,
                    self.source_name,
                    close_matches(structure, self.labels.values()),
                    detail="not a VISTA-3D class",
                )
        unsupported = [i for i in ids if i not in VISTA3D_SUPPORTED]  # the inferer drops class prompts > 132
        if unsupported:
            raise UnknownStructureError(
                structure,
                self.source_name,
                detail=f"class {unsupported} ({[self.labels[i] for i in unsupported]}) is not a supported class "
                "prompt of the bundle; it needs point prompts (zero-shot)",
            )
        return ids, [self.labels[i] for i in ids]

    def output_ids(self, ids: Sequence[int]) -> list[int]:
        """The class ids that appear in the prediction for these prompts (subclass prompts replaced by their parts)."""
        out: list[int] = []
        for i in ids:
            for j in self.subclass.get(int(i), (int(i),)):
                if j not in out:
                    out.append(j)
        return out

    # -- masks -----------------------------------------------------------------------------------------------------

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        """Run VISTA-3D with the structure's class prompt(s); the mask is on ``volume``'s grid (``volume_id`` is
        ignored). Several prompts (a union such as ``lung_left``) compete by argmax, as in the bundle."""
        return self.get_masks(volume, [structure])[structure]

    def get_masks(
        self, volume: CTVolume, structures: Sequence[str], *, volume_id: str | None = None
    ) -> dict[str, MaskResult]:
        """One network run for several structures: all their prompts together (they compete by argmax, as with a
        multi-class prompt in the bundle), then each structure's classes are selected."""
        requested = {name: self.class_ids(name) for name in structures}
        prompts: list[int] = []
        for ids, _ in requested.values():
            prompts.extend(i for i in ids if i not in prompts)
        labels = self.predict(volume, prompts)
        results = {}
        for name, (ids, names) in requested.items():
            out = self.output_ids(ids)
            mask = labels == out[0] if len(out) == 1 else np.isin(labels, out)
            results[name] = MaskResult(
                mask=mask,
                structure=name,
                resolved_name="+".join(names),
                source=self.source_name,
                components=tuple(names) if len(names) > 1 else (),
            )
        return results

    def predict(self, volume: CTVolume, prompts: Sequence[int]) -> np.ndarray:
        """The bundle pipeline for class prompts.

        Args:
            volume: CT volume in HU (any orientation; its affine says where it is).
            prompts: VISTA-3D class ids (subclass ids such as 20 "lung" are expanded by ``VistaPreTransformd``).

        Returns:
            (D, H, W) int16 class ids on ``volume``'s grid (0 = background).
        """
        import torch
        from monai.apps.vista3d.transforms import VistaPostTransformd, VistaPreTransformd
        from monai.data import MetaTensor
        from monai.inferers import SlidingWindowInfererAdapt
        from monai.transforms import (
            CastToTyped,
            Compose,
            CropForegroundd,
            Invertd,
            Orientationd,
            ScaleIntensityRanged,
            Spacingd,
        )

        if not prompts:
            raise ValueError("VISTA-3D needs at least one class prompt")
        volume = volume.to_hu()
        s = self.settings
        a_min, a_max = (float(v) for v in s["intensity_range"])
        transforms = [Spacingd("image", pixdim=tuple(float(v) for v in s["resample_spacing"]), mode="bilinear")]
        if (volume.array > 0).any():  # CropForegroundd keeps voxels > 0 HU; a volume without any would crop to 0
            transforms.append(
                CropForegroundd("image", source_key="image", margin=int(s["crop_margin"]), allow_smaller=True)
            )
        transforms += [
            VistaPreTransformd(
                "image",
                subclass={str(k): list(v) for k, v in self.subclass.items()},
                labels_dict={str(k): v for k, v in self.labels.items()},
            ),
            ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
            Orientationd("image", axcodes="RAS", labels=None),
            CastToTyped("image", dtype=torch.float32),
        ]
        preprocessing = Compose(transforms)

        image = MetaTensor(
            torch.as_tensor(np.ascontiguousarray(volume.array)[None], dtype=torch.float32),
            affine=torch.as_tensor(volume.affine, dtype=torch.float64),
            meta={"filename_or_obj": volume.path or "<array>"},
        ).to(self.device)
        data = preprocessing({"image": image, "label_prompt": [int(p) for p in prompts]})
        label_prompt = list(dict.fromkeys(int(p) for p in data["label_prompt"]))  # expanded, duplicates removed
        class_vector = torch.as_tensor(label_prompt, device=self.device).unsqueeze(-1)  # (N, 1)

        inferer = SlidingWindowInfererAdapt(
            roi_size=tuple(int(v) for v in s["patch_size"]),
            sw_batch_size=int(s["sw_batch_size"]),
            overlap=float(s["overlap"]),
            padding_mode=s["padding_mode"],
            with_coord=True,
        )
        autocast = self.amp and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, enabled=autocast):
            logits = inferer(
                data["image"].unsqueeze(0),  # (1, 1, X, Y, Z) in RAS at resample_spacing
                self.network,
                transpose=True,
                point_coords=None,
                point_labels=None,
                class_vector=class_vector,
                prompt_class=class_vector.clone(),
                prev_mask=None,
                labels=None,
                label_set=None,
            )  # (1, N, X, Y, Z)
        image_out = data["image"]
        data["pred"] = MetaTensor(logits[0].float(), meta=dict(image_out.meta))  # meta carries the affine
        data["label_prompt"] = torch.as_tensor(label_prompt, device=logits.device)
        data = VistaPostTransformd("pred")(data)
        data = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)(data)
        pred = torch.nan_to_num(data["pred"], nan=0.0)[0].detach().cpu().numpy()
        if pred.shape != volume.shape:
            raise RuntimeError(f"VISTA-3D output grid {pred.shape} differs from the volume grid {volume.shape}")
        return np.rint(pred).astype(np.int16)


# ---------------------------------------------------------------------------------------------------------------
# Bundle files
# ---------------------------------------------------------------------------------------------------------------


def _read_bundle(bundle_dir: Path) -> tuple[dict, dict[int, str] | None]:
    """Settings from ``configs/inference.json`` (plain values only) and the label dict of ``configs/metadata.json``."""
    if not bundle_dir.is_dir():
        raise CorruptFileError(
            bundle_dir,
            "VISTA-3D bundle folder not found (expected <bundle>/models/model.pt; download it online with "
            "monai.bundle.download('vista3d', bundle_dir=...))",
        )
    settings: dict = {}
    config_path = bundle_dir / "configs" / "inference.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if _is_numbers(config.get("resample_spacing"), 3):
            settings["resample_spacing"] = tuple(float(v) for v in config["resample_spacing"])
        if _is_numbers(config.get("patch_size"), 3):
            settings["patch_size"] = tuple(int(v) for v in config["patch_size"])
        if _is_numbers(config.get("sw_batch_size")):
            settings["sw_batch_size"] = int(config["sw_batch_size"])
        inferer = config.get("inferer")
        if isinstance(inferer, dict) and _is_numbers(inferer.get("overlap")):
            settings["overlap"] = float(inferer["overlap"])
        transforms = config.get("preprocessing_transforms")
        for transform in transforms if isinstance(transforms, list) else []:
            if not isinstance(transform, dict):
                continue
            target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
            if target == "ScaleIntensityRanged" and _is_numbers([transform.get("a_min"), transform.get("a_max")], 2):
                settings["intensity_range"] = (float(transform["a_min"]), float(transform["a_max"]))
            if target == "CropForegroundd" and _is_numbers(transform.get("margin")):
                settings["crop_margin"] = int(transform["margin"])
        subclass = config.get("subclass")
        if isinstance(subclass, dict):
            settings["subclass"] = {
                int(k): tuple(int(i) for i in v) for k, v in subclass.items() if str(k).isdigit() and _is_numbers(v)
            }
    labels = None
    metadata_path = bundle_dir / "configs" / "metadata.json"
    if metadata_path.is_file():
        metadata = _read_json(metadata_path)
        try:
            channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
            labels = {int(k): str(v) for k, v in channel_def.items() if int(k) > 0}
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(
                metadata_path, f"no label dictionary at network_data_format.outputs.pred.channel_def ({err})"
            ) from err
    return settings, labels or None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptFileError(path, f"cannot read JSON ({type(err).__name__}: {err})") from err
    if not isinstance(value, dict):
        raise CorruptFileError(path, "expected a JSON object")
    return value


def _is_numbers(value, length: int | None = None) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return length is None
    return (
        isinstance(value, (list, tuple))
        and (length is None or len(value) == length)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _load_weights(network, path: Path) -> None:
    """Load ``models/model.pt`` (state dict or ``{"model": state_dict}``) into ``network``, strictly."""
    import torch

    if not path.is_file():
        raise CorruptFileError(
            path,
            "VISTA-3D weights not found: the bundle layout is <bundle>/models/model.pt (download the bundle online "
            "with monai.bundle.download('vista3d', bundle_dir=...))",
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise CorruptFileError(path, f"cannot read VISTA-3D weights ({type(err).__name__}: {err})") from err
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CorruptFileError(path, "not a state dict (expected parameter name → tensor, or {'model': state_dict})")
    checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    try:
        network.load_state_dict(checkpoint, strict=True)
    except RuntimeError as err:
        expected = set(network.state_dict())
        missing, unexpected = sorted(expected - set(checkpoint)), sorted(set(checkpoint) - expected)
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else str(err)[:300]
        raise CorruptFileError(path, f"weights do not fit the VISTA-3D network ({detail})") from err
