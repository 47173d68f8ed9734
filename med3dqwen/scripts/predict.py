"""Answer one question about one CT with a Med3DQwen model: prints the answer, writes answer.json and the overlay.

Usage (see docs/inference.md):

    # a region by name, segmented on the fly (HU thresholds: body, lungs, airway, bone)
    med3dqwen-predict --model runs/sft --volume ct.nii.gz --question "Is there a nodule in the left lung?" \
        --roi "left lung" --segmenter threshold --output_dir out/

    # a mask file (one label of a multi-label map), a LoRA adapter on its base model, the blue contour
    med3dqwen-predict --adapter runs/demo-sft --volume dicom_dir/ \
        --question "What abnormality is seen in the liver?" --mask seg.nii.gz --label liver --prompt blue \
        --output_dir out/

    # the whole volume, no boundary prompt
    med3dqwen-predict --model runs/sft --volume ct.nii.gz --question "Describe the findings." --output_dir out/

    # a CT-RATE original (blank header: raw values, HU = value - 1024)
    med3dqwen-predict --model runs/sft --volume train_1_a_1.nii.gz --rescale 1 -1024 --question "Describe it."

Bad input (a missing or unreadable file, a mask from another scan, an unknown region name, an offline Hub id, an
adapter trained on another model) prints one line ``med3dqwen-predict: error: <input> '<value>': <problem>`` to
stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["PredictArguments", "cli", "main", "make_parser"]


@dataclass
class PredictArguments:
    """The options of ``med3dqwen-predict`` (one per field)."""

    volume: str = field(metadata={"help": "CT volume: .nii / .nii.gz, a DICOM folder or file, or .npy (D, H, W)."})
    question: str = field(metadata={"help": "The question, as a user would ask it."})
    model: str | None = field(
        default=None, metadata={"help": "Med3DQwen model folder or Hub id (default: the --adapter's base model)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder for answer.json and overlay_montage.png."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder or Hub id trained on --model."})
    mask: str | None = field(default=None, metadata={"help": "ROI mask file on the volume's grid (NIfTI / .npy)."})
    label: str | None = field(
        default=None, metadata={"help": "Label id or name to outline in a multi-label --mask (e.g. liver)."}
    )
    roi: str | None = field(
        default=None, metadata={"help": "Region name (RadLex / TotalSegmentator / VISTA-3D), segmented on the fly."}
    )
    segmenter: str = field(
        default="threshold",
        metadata={"help": "Segmenter for --roi.", "choices": ["threshold", "vista3d", "totalsegmentator"]},
    )
    vista3d_bundle: str | None = field(
        default=None,
        metadata={"help": "VISTA-3D bundle folder for --segmenter vista3d (or MED3DQWEN_VISTA3D_BUNDLE)."},
    )
    prompt: str = field(
        default="red", metadata={"help": "Contour colour, or none for no prompt.", "choices": ["red", "blue", "none"]}
    )
    choices: list[str] | None = field(
        default=None,
        metadata={"help": "Label set of a closed multiple-choice question ('A. ...' 'B. ...').", "nargs": "+"},
    )
    answer_type: str = field(
        default="auto",
        metadata={
            "help": "auto (yes/no for 'Is/Does ...' questions), closed or open.",
            "choices": ["auto", "closed", "open"],
        },
    )
    intensity: str | None = field(
        default=None,
        metadata={
            "help": "unit: values already in [0, 1] (M3D-VQA .npy), not windowed; default HU.",
            "choices": ["hu", "unit"],
        },
    )
    rescale: list[float] | None = field(
        default=None,
        metadata={"help": "SLOPE INTERCEPT: HU = value * slope + intercept (CT-RATE originals: 1 -1024).", "nargs": 2},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})


def make_parser():
    """The command-line parser: :class:`PredictArguments`' fields as ``--name`` options; ``--help`` shows this
    module's docstring."""
    import argparse

    from transformers import HfArgumentParser

    return HfArgumentParser(
        PredictArguments, prog="med3dqwen-predict", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )


def main(args: PredictArguments):
    """Run one prediction and print it; returns the :class:`~med3dqwen.inference.Prediction`."""
    from med3dqwen.inference import PredictError, predict

    if args.mask is not None and args.roi is not None:
        raise PredictError("roi", args.roi, "give either --mask (with --label) or --roi, not both")
    if args.label is not None and args.mask is None:
        raise PredictError("label", args.label, "--label picks a label of --mask; give --mask too (or use --roi)")
    options = {"bundle_dir": args.vista3d_bundle} if args.vista3d_bundle and args.segmenter == "vista3d" else None
    prediction = predict(
        args.model,
        args.volume,
        args.question,
        adapter=args.adapter,
        mask=args.mask,
        label=args.label,
        roi=args.roi,
        segmenter=args.segmenter,
        segmenter_options=options,
        prompt=args.prompt,
        choices=args.choices,
        answer_type=args.answer_type,
        output_dir=args.output_dir,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        intensity=args.intensity,
        rescale=None if args.rescale is None else tuple(args.rescale),
    )
    print(f"question: {prediction.rewritten_question}")
    print(f"answer: {prediction.answer}")
    if prediction.probabilities is not None:
        shown = ", ".join(f"{name} {p:.3f}" for name, p in prediction.probabilities.items())
        print(f"closed head: {prediction.closed_answer} ({shown})")
    roi = f"{prediction.roi} from {prediction.mask_source}" if prediction.roi else prediction.mask_source
    covered = "" if prediction.covered_fraction is None else f", band covers {prediction.covered_fraction:.1%} of it"
    print(
        f"prompt: {prediction.prompt}; ROI: {roi}; contour on {len(prediction.contour_slices)}/"
        f"{prediction.num_slices} slices{covered}"
    )
    for note in prediction.warnings:
        print(f"warning: {note}")
    if args.output_dir:
        written = [str(Path(args.output_dir) / "answer.json"), prediction.overlay_montage]
        print("wrote " + " and ".join(path for path in written if path))
    return prediction


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-predict``: bad input is one line on stderr and exit status 2."""
    import warnings

    parser = make_parser()
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    from med3dqwen.inference import PredictError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # predict's warnings are printed with the answer
        try:
            main(args)
        except PredictError as err:
            print(f"med3dqwen-predict: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
