"""Path safety for names and paths taken from upstream data: one exception class, two checks (med3dqwen.io)."""

import pickle

import pytest

from med3dqwen.io import UnsafePathError, check_path_component, safe_relpath
from med3dqwen.processing.ct_io import CTInputError


@pytest.mark.parametrize("value", ["..", ".", "a/b", "a\\b", "../x", "x/..", "/etc", "C:x", "", "  ", "a\x00b"])
def test_check_path_component_rejects_escapes_naming_the_value(value):
    with pytest.raises(UnsafePathError) as info:
        check_path_component(value, "structure name")
    assert f"structure name {value!r}" in str(info.value)


@pytest.mark.parametrize("value", ["liver", "right lung upper lobe", "thoracic vertebrae 7 (t7)", "train_362_a_1"])
def test_check_path_component_accepts_dataset_names(value):
    assert check_path_component(value, "structure name") == value


def test_one_exception_class_for_both_checks():
    # Mask sources catch CTInputError, builders ValueError: the one class is both, and survives worker processes.
    errors = []
    for check in (lambda: check_path_component("..", "volume id"), lambda: safe_relpath("a", "../b")):
        with pytest.raises(UnsafePathError) as info:
            check()
        errors.append(info.value)
    for err in errors:
        assert isinstance(err, CTInputError) and isinstance(err, ValueError)
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is UnsafePathError and str(clone) == str(err)
    assert str(UnsafePathError("resolves outside the mask root /r", "/r/../x")) == (
        "/r/../x: resolves outside the mask root /r"
    )
