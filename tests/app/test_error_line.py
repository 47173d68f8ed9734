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
