"""Evaluate a Med3DQwen model on a dataset split: Table-1 metrics, per-sample predictions, chart, memory, latency.

Usage (from the repository root; see docs/evaluation.md):

    # one run: results.json, predictions.jsonl, table.md and chart.png in OUT (rerun the same command to resume)
    python evaluate.py --model_name_or_path runs/sft --dataset_name data/phantom --split test --output_dir eval/sft

    # a LoRA adapter on its base model, the M3D protocol, the first 100 questions
    python evaluate.py --model_name_or_path runs/base --adapter runs/sft/adapter --dataset_name data/phantom \
        --split test --output_dir eval/sft-m3d --protocol m3d --max_samples 100 --batch_size 8

    # one table and one chart from several runs, with paired bootstrap 95 % intervals against the first
    python evaluate.py --compare eval/no_prompt eval/sft --output_dir eval/compare

    # sharded over processes, one per GPU (the results equal one process's); on CPU add --device cpu
    accelerate launch --multi_gpu --num_processes 4 evaluate.py --model_name_or_path runs/sft/base \
        --adapter runs/sft --dataset_name data/phantom --split test --output_dir eval/sft

This file has the name the package's users expect, and from the repository root it sits on ``sys.path`` ahead of the
``evaluate`` library. So it imports nothing at module level, and when it is imported under the name ``evaluate``
(``python -m pytest`` or ``python -c "import evaluate"`` from the root) it hands ``sys.modules["evaluate"]`` over to
the library, found on ``sys.path`` without this folder: ``import evaluate`` gives the library there too.
"""

from __future__ import annotations


def make_parser():
    """The command-line parser: ``EvaluationArguments``' fields as ``--name`` options."""
    from transformers import HfArgumentParser

    from med3dqwen.evaluation.runner import EvaluationArguments

    return HfArgumentParser(EvaluationArguments)


def main(args=None) -> dict | str | None:
    """Evaluate (``args.compare`` unset) or compare runs; prints the table and returns the results or table (None on
    the other processes of a sharded run: the main process writes and prints)."""
    from pathlib import Path

    from med3dqwen.evaluation.runner import evaluate_model, run_comparison

    if args is None:
        (args,) = make_parser().parse_args_into_dataclasses()
    if args.compare:
        table = run_comparison(args)
        print(table)
        return table
    results = evaluate_model(args)
    if results is not None:
        print((Path(args.output_dir) / "table.md").read_text())
    return results


def _hand_over_to_the_library():
    """Replace this module in ``sys.modules`` by the ``evaluate`` library, found on ``sys.path`` without this folder.

    Runs only when this file is imported under the name ``evaluate`` (the repository root on ``sys.path``: ``python
    -m pytest``, ``python -c``, a notebook started there), so that such an ``import evaluate`` gives the library.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("evaluate", path)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"the `evaluate` library is not installed (pip install evaluate); {__file__} is Med3DQwen's script"
        )
    library = importlib.util.module_from_spec(spec)
    sys.modules["evaluate"] = library
    spec.loader.exec_module(library)


if __name__ == "evaluate":
    _hand_over_to_the_library()

if __name__ == "__main__":
    main()
