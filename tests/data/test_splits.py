"""Tests for med3dqwen.data.splits."""

from collections import Counter

import pytest

from med3dqwen.data.splits import assign_split


def test_deterministic_and_seeded():
    ids = [f"train_{i}" for i in range(200)]
    first = [assign_split(i, seed=0) for i in ids]
    assert first == [assign_split(i, seed=0) for i in ids]
    assert first != [assign_split(i, seed=1) for i in ids]


def test_ratios_are_respected_on_many_groups():
    counts = Counter(assign_split(f"patient_{i}", seed=3) for i in range(20000))
    assert counts["train"] / 20000 == pytest.approx(0.7, abs=0.015)
    assert counts["validation"] / 20000 == pytest.approx(0.1, abs=0.01)
    assert counts["test"] / 20000 == pytest.approx(0.2, abs=0.01)


def test_custom_ratios_and_names():
    assert {assign_split(f"a{i}", ratios=(1.0, 0.0), names=("dev", "x")) for i in range(50)} == {"dev"}
    assert {assign_split(f"a{i}", ratios=(0.8, 0.1, 0.1)) for i in range(500)} == {"train", "validation", "test"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_id": ""}, "non-empty"),
        ({"group_id": "a", "ratios": (0.5, 0.4)}, "ratios"),
        ({"group_id": "a", "ratios": (0.5, 0.6, -0.1)}, "ratios"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_split(**kwargs)
