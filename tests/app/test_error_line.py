"""The page's error line: one line naming the input, whatever the error held."""

import numpy as np
import pytest

from med3dqwen.app.ui import one_line_error
from med3dqwen.inference import PredictError
from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import CTVolume, MaskMismatchError, load_mask, standard_affine


def test_multiline_input_errors_keep_their_first_line(tmp_path):
    volume = CTVolume.from_array(np.zeros((4, 8, 8), dtype=np.float32), spacing=(1.0, 1.0, 1.0), name="ct.nii.gz")
    mask = save_nifti(tmp_path / "m.nii.gz", np.ones((4, 8, 8), bool), standard_affine((2.0, 1.0, 1.0)))
    with pytest.raises(MaskMismatchError) as info:
        load_mask(mask, like=volume)
    assert "\n" in str(info.value)  # the affines, row by row
    assert one_line_error(info.value) == f"{mask}: mask affine differs from the volume's (ct.nii.gz)"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (PredictError("adapter", "runs/x", "trained on\nanother base"), "adapter 'runs/x': trained on another base"),
        (RuntimeError("CUDA out of memory.\nTried to allocate"), "RuntimeError: CUDA out of memory."),
        (ValueError(""), "ValueError"),
    ],
)
def test_one_line_per_error(error, line):
    assert one_line_error(error) == line


def test_handlers_with_nothing_to_do_give_gradio_a_valid_update(tmp_path):
    # Loading a case empties the ROI box, whose change event then has nothing to draw; an empty dict was read by
    # Gradio as one output value and failed ("didn't return enough output values"), leaving the page stale.
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from med3dqwen.app.ui import build_app

    demo = build_app("no-model-needed", output_root=tmp_path)
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    idle = {fn.name: fn for fn in fns if fn.name in ("on_roi", "on_slice", "on_example", "on_upload")}
    assert set(idle) == {"on_roi", "on_slice", "on_example", "on_upload"}
    for name, block_fn in idle.items():
        result = block_fn.fn(*([None] * len(block_fn.inputs)))
        assert isinstance(result, dict) and result, name
        # raises on a malformed update; in a thread of its own, as Playwright's sync API may hold this one's loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, demo.postprocess_data(block_fn, result, None)).result()
