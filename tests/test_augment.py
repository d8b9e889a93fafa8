"""Memory-bank augmentation at fit (`--augment flips`): what the bank learns from."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.export.fit import AUGMENTS, augmented


def test_flips_add_the_three_mirrors_of_each_frame_in_order() -> None:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    b = a + 100
    out = augmented([a, b], "flips")
    assert len(out) == 8
    for i, f in enumerate((a, b)):
        got = out[4 * i : 4 * i + 4]
        np.testing.assert_array_equal(got[0], f)
        np.testing.assert_array_equal(got[1], f[:, ::-1])
        np.testing.assert_array_equal(got[2], f[::-1])
        np.testing.assert_array_equal(got[3], np.rot90(f, 2, axes=(0, 1)))
        assert all(g.flags.c_contiguous for g in got)  # np.stack and ORT want plain arrays


def test_none_is_the_frames_themselves_and_unknown_kinds_are_refused() -> None:
    frames = [np.zeros((4, 4, 3), np.uint8)]
    assert augmented(frames, "none") is frames
    assert AUGMENTS == ("none", "flips")
    with pytest.raises(ValueError, match="augment"):
        augmented(frames, "rot90")
