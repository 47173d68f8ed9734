"""The grounding diagnostic: the measure on hand-built attention, token footprints through a hand-set projector, the
whole run on a tiny model whose attention is forced to a known pattern, the command line on a phantom build, and
bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2
from tiny_models import tiny_config
from training.train_helpers import SMALL, build_phantom, lora_model, tiny_model, tiny_processor

import med3dqwen.diagnostics
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import chat_messages, message_texts
from med3dqwen.diagnostics.footprints import cell_roi_fractions, mixer_weight_flow, token_footprints
from med3dqwen.diagnostics.grounding import (
    GroundingArguments,
    attention_shares,
    cli,
    no_prompt_record,
    run_grounding,
)
from med3dqwen.io import save_nifti


ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = (64, 64, 64)  # the tiny config's model grid: low stage 3 = 2x2x2 cells of 32^3, high stage 4 = 1 cell, 4 slabs
# With the selection projector below: low token j <- cell j (j < 4), the 4 high tokens <- the one stage-4 cell. The
# ROI is the first octant = low cell 0 = slabs 0 and 1, so f = [1, 0, 0, 0, 1/8, 1/8, 1/8, 1/8].
INSIDE = np.array([1, 0, 0, 0, 1 / 8, 1 / 8, 1 / 8, 1 / 8])
SLABS_IN_ROI = np.array([True, True, False, False])


# ---------------------------------------------------------------------------------------------------------------
# The measure alone
# ---------------------------------------------------------------------------------------------------------------


def attention_on(length: int, weights: dict[int, float], noise_rows=()) -> torch.Tensor:
    """(1, 2, length, length) causal-looking weights whose rows all put ``weights`` on their keys, except the
    ``noise_rows``, which attend elsewhere (they must not count)."""
    row = torch.zeros(length)
    for position, value in weights.items():
        row[position] = value
    attention = row.expand(2, length, length).clone()
    for r in noise_rows:
        attention[:, r] = 0.0
        attention[:, r, 0] = 1.0
    return attention[None]


def test_shares_of_hand_built_attention():
    visual, slices, queries = [2, 3, 4, 5], [6, 7], [8, 9]
    inside = np.array([1.0, 1.0, 0.0, 0.5])
    only_inside = attention_on(11, {2: 0.25, 3: 0.25, 6: 0.5}, noise_rows=[10])
    uniform = attention_on(11, {p: 1 / 6 for p in visual + slices}, noise_rows=[10])
    elsewhere = attention_on(11, {0: 1.0})
    shares = attention_shares([only_inside, uniform[0], elsewhere], queries, visual, inside, slices, [True, False])
    assert shares[0].share_inside == pytest.approx(1.0) and shares[0].visual_attention == pytest.approx(0.5)
    assert shares[0].inside == pytest.approx(0.5) and shares[0].outside == pytest.approx(0.0)
    assert shares[0].slice_share_roi == pytest.approx(1.0)
    assert shares[1].share_inside == pytest.approx(inside.mean())  # uniform: the ROI token fraction
    assert shares[1].slice_share_roi == pytest.approx(0.5) and shares[1].slice_attention == pytest.approx(1 / 3)
    assert shares[2].visual_attention == 0.0 and shares[2].share_inside is None and shares[2].slice_share_roi is None


def test_shares_refuse_mismatched_input():
    attention = [attention_on(6, {1: 1.0})]
    with pytest.raises(ValueError, match="no answer query"):
        attention_shares(attention, [], [1, 2], np.ones(2))
    with pytest.raises(ValueError, match="2 visual token positions but 3 footprint"):
        attention_shares(attention, [4], [1, 2], np.ones(3))
    with pytest.raises(ValueError, match="visual positions reach 9, the sequence has 6"):
        attention_shares(attention, [4], [1, 9], np.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# Footprints
# ---------------------------------------------------------------------------------------------------------------


def selection(rows: int, columns: int) -> torch.Tensor:
    """(rows, columns) weights whose row i takes input i (i < columns), zero elsewhere."""
    return torch.eye(rows, columns)


def selection_projector(model) -> None:
    """Make each low-stream token a copy of one stage-3 cell (token j <- cell j) through every token MLP."""
    with torch.no_grad():
        for layer in model.model.multi_modal_projector.low_mixer:
            for linear in (m for m in layer.mlp1.modules() if isinstance(m, torch.nn.Linear)):
                linear.weight.copy_(selection(*linear.weight.shape))


def octant_roi() -> np.ndarray:
    roi = np.zeros(SIZE, dtype=bool)
    roi[:32, :32, :32] = True
    return roi


def test_weight_flow_composes_absolute_token_weights():
    layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    layers[0].mlp1 = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    layers[1].mlp1 = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        layers[0].mlp1[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]]))
        layers[1].mlp1[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    flow = mixer_weight_flow(layers)
    assert torch.allclose(flow, torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]))
    with torch.no_grad():
        layers[1].mlp1[0].weight.zero_()
    with pytest.raises(ValueError, match=r"output tokens \[0, 1\] get no weight"):
        mixer_weight_flow(layers)


def test_cell_fractions_are_depth_major():
    roi = np.zeros((4, 4, 4), dtype=bool)
    roi[2:, :2, 2:] = True  # cell (d=1, h=0, w=1) -> index 1*4 + 0*2 + 1 = 5
    roi[0, 0, 0] = True  # one voxel of the 8 in cell 0
    assert cell_roi_fractions(roi, (2, 2, 2)).tolist() == [1 / 8, 0, 0, 0, 0, 1, 0, 0]


def test_token_footprints_of_a_selection_projector():
    model = tiny_model(tiny_config())
    selection_projector(model)
    footprints = token_footprints(model)
    assert footprints.num_visual_tokens == 8 and footprints.slice_depth == 16
    np.testing.assert_allclose(footprints.inside_fractions(octant_roi()), INSIDE)
    assert footprints.slice_in_roi(octant_roi()).tolist() == SLABS_IN_ROI.tolist()
    with pytest.raises(ValueError, match="differs from the model grid"):
        footprints.inside_fractions(np.ones((32, 64, 64), dtype=bool))


def test_footprints_through_a_peft_wrapper():
    wrapped = lora_model(tiny_config())
    assert torch.equal(token_footprints(wrapped).low_flow, token_footprints(wrapped.get_base_model()).low_flow)


# ---------------------------------------------------------------------------------------------------------------
# A run with forced attention
# ---------------------------------------------------------------------------------------------------------------


def write_dataset(folder: Path, masks: dict[str, np.ndarray | None]) -> Path:
    """A built-dataset folder with one 64^3 volume and one open question per named mask (None: no mask_path)."""
    rng = np.random.default_rng(0)
    save_nifti(folder / "volume.nii.gz", rng.integers(-1000, 400, SIZE).astype(np.int16))
    lines = []
    for name, mask in masks.items():
        mask_path = None
        if mask is not None:
            mask_path = f"masks/{name}.nii.gz"
            save_nifti(folder / mask_path, mask)
        record = {
            "messages": chat_messages(
                system_prompt("red"),
                "Within the red-outlined area of the CT volume, what is seen?",
                "Within the red boundary, a nodule.",
            ),
            "volume_path": "volume.nii.gz",
            "mask_path": mask_path,
            "roi": name,
            "question_type": "abnormality",
            "answer_type": "open",
            "volume_id": "v0",
        }
        lines.append(json.dumps(record))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "test.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def model_and_processor():
    config = tiny_config()
    model = tiny_model(config).eval()
    selection_projector(model)
    return model, tiny_processor(config)


def force_attention(monkeypatch, model, layer_patterns) -> None:
    """Replace the attention weights each decoder layer returns by ``layer_patterns[layer](input_ids) -> (L,)`` on
    every row (the layer's output still comes from its real weights: only what the diagnostic reads changes)."""
    captured = {}
    model.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: captured.update(ids=kwargs["input_ids"][0]), with_kwargs=True
    )
    original = qwen2.eager_attention_forward

    def forced(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        row = layer_patterns[module.layer_idx](captured["ids"]).to(weights.dtype)
        return output, row.expand_as(weights).clone()

    monkeypatch.setattr(qwen2, "eager_attention_forward", forced)


def test_forced_attention_gives_the_known_shares(tmp_path, monkeypatch, model_and_processor):
    model, processor = model_and_processor
    config = model.config
    data = write_dataset(tmp_path / "data", {"octant": octant_roi(), "whole_volume": None})

    def uniform(ids):  # layer 0: uniform over every image token
        image = (ids == config.image_token_id) | (ids == config.slice_token_id)
        return image.float() / image.sum()

    def inside_only(ids):  # layer 1: half on the visual token inside the ROI, half on the ROI slabs' slice tokens
        row = torch.zeros(len(ids))
        visual = (ids == config.image_token_id).nonzero()[:, 0]
        slices = (ids == config.slice_token_id).nonzero()[:, 0]
        row[visual[torch.as_tensor(INSIDE == 1)]] = 0.5
        row[slices[torch.as_tensor(SLABS_IN_ROI)]] = 0.25
        return row

    force_attention(monkeypatch, model, [uniform, inside_only])
    args = GroundingArguments(
        model="tiny", dataset=str(data), split="test", output_dir=str(tmp_path / "out"), progress=False
    )
    results = run_grounding(args, model=model, processor=processor)
    for variant in ("prompt", "none"):
        summary = results["variants"][variant]
        assert summary["rows_measured"] == 1
        assert summary["rows_skipped"] == {"no mask_path (whole-volume question)": 1}
        first, second = summary["layers"]
        assert first["share_inside"] == pytest.approx(INSIDE.mean())  # uniform: the ROI token fraction, 0.1875
        assert first["roi_token_fraction"] == pytest.approx(INSIDE.mean())
        assert first["enrichment"] == pytest.approx(1.0)
        assert first["visual_attention"] == pytest.approx(8 / 12) and first["slice_share_roi"] == pytest.approx(0.5)
        assert second["share_inside"] == pytest.approx(1.0) and second["outside"] == pytest.approx(0.0)
        assert second["visual_attention"] == pytest.approx(0.5) and second["slice_share_roi"] == pytest.approx(1.0)
        assert second["enrichment"] == pytest.approx(1 / INSIDE.mean())
    assert results["paired"]["rows"] == 1
    assert results["paired"]["share_inside_difference"] == pytest.approx([0.0, 0.0])
    on_disk = json.loads((tmp_path / "out" / "grounding.json").read_text())
    assert on_disk["variants"]["prompt"]["layers"] == results["variants"]["prompt"]["layers"]
    assert (tmp_path / "out" / "grounding.png").read_bytes().startswith(PNG_SIGNATURE)
    layers = sorted((tmp_path / "out" / "layers").iterdir())
    assert [p.name for p in layers] == [f"layer_{k}.png" for k in range(len(layers))] and layers
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in layers)
    # the answer's queries only: the last prompt token and the answer tokens but the last (its <|im_end|> target)
    row = results["rows"][0]
    answer = processor.tokenizer("Within the red boundary, a nodule.<|im_end|>")["input_ids"]
    assert row["answer_tokens"] == len(answer)


def test_the_no_prompt_variant_drops_contour_and_wording():
    record = {
        "messages": chat_messages(
            system_prompt("red"), "Inside the red boundary, is there a nodule?", "Within the red boundary, a nodule."
        ),
        "mask_path": "m.nii.gz",
        "answer_type": "open",
    }
    shown = no_prompt_record(record)
    texts = message_texts(shown)
    assert shown["mask_path"] is None and record["mask_path"] == "m.nii.gz"
    assert texts == {"system": system_prompt(prompt=False), "user": "Is there a nodule?", "assistant": "A nodule."}


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_rows_without_a_usable_roi(tmp_path, model_and_processor):
    model, processor = model_and_processor
    data = write_dataset(tmp_path / "data", {"empty": np.zeros(SIZE, dtype=bool), "whole_volume": None})
    args = GroundingArguments(model="tiny", dataset=str(data), output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match=r"no row of .* can be measured for variant 'prompt' \(2 rows: .*"
                       r"1 ROI empty on the model grid"):  # fmt: skip
        run_grounding(args, model=model, processor=processor)
    assert not (tmp_path / "out" / "grounding.json").exists()
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['test'\]"):
        run_grounding(
            GroundingArguments(model="tiny", dataset=str(data), split="validation", output_dir=str(tmp_path)),
            model=model,
            processor=processor,
        )


def test_unreadable_mask_names_the_row(tmp_path, model_and_processor):
    model, processor = model_and_processor
    data = write_dataset(tmp_path / "data", {"octant": octant_roi()})
    (data / "masks" / "octant.nii.gz").write_bytes(b"not a nifti")
    args = GroundingArguments(model="tiny", dataset=str(data), output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match=r"split 'test' row 0 .*masks/octant.nii.gz"):
        run_grounding(args, model=model, processor=processor)


def test_a_model_without_attention_weights_is_refused(tmp_path, monkeypatch, model_and_processor):
    _, processor = model_and_processor
    model = tiny_model(tiny_config()).eval()
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: None)  # a model that won't switch
    data = write_dataset(tmp_path / "data", {"octant": octant_roi()})
    args = GroundingArguments(model="tiny", dataset=str(data), output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(RuntimeError, match=r"row 0 .*returned no attention weights \(none\).*'sdpa'"):
        run_grounding(args, model=model, processor=processor)


def test_package_modules_run_with_python_m():
    # runpy (python -m med3dqwen.diagnostics.grounding) asks the spec's loader for the code; the package's import
    # watcher wraps that loader, which must hand get_code on
    watcher = next(f for f in sys.meta_path if type(f).__name__ == "_ImportWatcher")
    spec = watcher.find_spec("med3dqwen.diagnostics.grounding", med3dqwen.diagnostics.__path__)
    assert type(spec.loader).__name__ == "_NotifyingLoader"
    assert spec.loader.get_code("med3dqwen.diagnostics.grounding").co_filename.endswith("grounding.py")


def test_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: dataset .*missing.* is not a folder here"):
        cli(["--model", "m", "--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    data = write_dataset(tmp_path / "data", {"octant": octant_roi()})
    with pytest.raises(SystemExit, match=r"^error: cannot load model '\S*nowhere' \(adapter None\): [^\n]*$"):
        cli(["--model", str(tmp_path / "nowhere"), "--dataset", str(data), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^error: the grounding diagnostic needs --model"):
        cli(["--dataset", "d", "--output_dir", str(tmp_path / "out")])


def test_parser_reads_the_options():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(GroundingArguments).parse_args_into_dataclasses(
        ["--model", "m", "--dataset", "d", "--output_dir", "o", "--variants", "none", "--answer", "generated"]
    )
    assert args.variants == ["none"] and args.answer == "generated" and args.split == "test"
    with pytest.raises(SystemExit):  # argparse refuses a variant outside the choices
        HfArgumentParser(GroundingArguments).parse_args_into_dataclasses(
            ["--model", "m", "--dataset", "d", "--output_dir", "o", "--variants", "blue"]
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": None}, "needs --dataset"),
        ({"variants": ["prompt", "blue"]}, "--variants must be among"),
        ({"variants": ["prompt"], "compare_dataset": "x"}, "keep 'none'"),
        ({"answer": "sampled"}, "--answer must be one of"),
        ({"max_samples": 0}, "--max_samples must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    values = {"model": "m", "dataset": "d", "output_dir": "o", **kwargs}
    with pytest.raises(ValueError, match=match):
        GroundingArguments(**values)


# ---------------------------------------------------------------------------------------------------------------
# The command line on a saved tiny model and a phantom build
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two phantom builds and a subprocess (about 40 s on a busy 2-core machine)
def test_command_line_on_a_phantom_build(tmp_path):
    config = tiny_config()
    model_dir = tmp_path / "model"
    tiny_model(config).save_pretrained(model_dir)
    tiny_processor(config).save_pretrained(model_dir)
    data = build_phantom(tmp_path / "phantom", num_volumes=2)
    # the same phantoms as a no-prompt build, for --compare_dataset (its rows pair with the prompted ones)
    none = tmp_path / "none"
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(none), num_volumes=2, seed=2, shape=SMALL, prompt="none", write_png="none"),
        BuildArguments(progress=False),
    )
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "med3dqwen.diagnostics.grounding", "--model", str(model_dir), "--dataset", str(data),
        "--compare_dataset", str(none), "--split", "train", "--max_samples", "3", "--answer", "generated",
        "--max_new_tokens", "3", "--output_dir", str(out), "--progress", "false",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt: 3 rows measured" in result.stdout and "layer  1: share inside" in result.stdout
    results = json.loads((out / "grounding.json").read_text())
    assert set(results["variants"]) == {"prompt", "none"} and results["num_layers"] == 2
    assert results["variants"]["none"]["dataset"] == str(none)
    assert results["paired"]["rows"] == 3  # the two builds' rows pair up
    for summary in results["variants"].values():
        assert summary["rows_measured"] == 3 and len(summary["layers"]) == 2
        for entry in summary["layers"]:
            assert 0.0 <= entry["share_inside"] <= 1.0 and 0.0 < entry["roi_token_fraction"] < 1.0
            assert entry["inside"] + entry["outside"] == pytest.approx(entry["visual_attention"])
    assert all(1 <= row["answer_tokens"] <= 3 for row in results["rows"])  # generated, at most 3 new tokens
    assert (out / "grounding.png").read_bytes().startswith(PNG_SIGNATURE)
