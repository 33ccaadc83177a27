"""The CLI's tables: nothing cut, columns never run together, numbers aligned."""

from __future__ import annotations

from hotdog_ray.tables import render


def test_long_names_are_whole_and_columns_stay_apart():
    names = [f"train_fn_1a2b3c4d_{i:05d}_{i}_dropout=0.3,filters=32,lr=0.001" for i in range(3)]
    out = render(["kind", "status", "name"], [["scoring", "FINISHED", n] for n in names])
    for name in names:
        assert name in out  # no two trials of a sweep read the same
    rows = [line.split() for line in out.splitlines()[2:]]
    assert all(row[:2] == ["scoring", "FINISHED"] for row in rows)  # not "scoringFINISHED"


def test_numbers_are_right_aligned_and_none_is_a_dash():
    out = render(["model", "parameters"], [["first_cnn", "1,615,905"], ["vgg16", None]]).splitlines()
    assert out[2].endswith("1,615,905") and out[3].endswith("-")
    assert len(out[2]) == len(out[3])


def test_no_header_when_every_column_is_unnamed():
    assert render(["", ""], [["accuracy", "0.75"]]).splitlines() == ["accuracy   0.75"]
