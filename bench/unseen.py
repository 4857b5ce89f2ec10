"""Good tiles the model has never seen: MTD's test goods without their other shots in training.

MTD shoots each tile several times, a few frames apart and each time at another exposure
(``exp1_num_11276.jpg`` and ``exp2_num_11292.jpg`` are one tile), and its split puts the shots of
one good tile on both sides: 92 of its 95 good test tiles have another shot in ``train/good``,
while its defective tiles have none. A patch memory that holds the very tile finds it good more
easily than a new one, as no plant's model meets its next part. ``bench.accuracy --unseen-good``
trains without the shots of the test's good tiles.
"""

from __future__ import annotations

import re

from PIL import Image

from workers.datasets import Sample

# Shots of one tile lie 10 to 50 frames apart (a few up to 100), their crops within about
# 20 px of each other; the next tile's shots are hundreds of frames on.
FRAME_GAP = 100
SIZE_GAP = 25
_NAME = re.compile(r"exp\d+_num_(\d+)$")

Shot = tuple[int, int, int]  # frame number, width, height


def without_test_tiles(train: list[Sample], test: list[Sample]) -> list[Sample]:
    """``train`` less every shot of a good tile of ``test`` (names not MTD's are kept)."""
    goods = [shot for s in test if not s.is_defect and (shot := _shot(s))]
    return [s for s in train if not any(_same_tile(_shot(s), g) for g in goods)]


def _shot(sample: Sample) -> Shot | None:
    found = _NAME.search(sample.path.stem)
    if found is None:
        return None
    with Image.open(sample.path) as image:  # reads the header only
        return (int(found.group(1)), *image.size)


def _same_tile(a: Shot | None, b: Shot) -> bool:
    return (
        a is not None
        and abs(a[0] - b[0]) <= FRAME_GAP
        and all(abs(x - y) <= SIZE_GAP for x, y in zip(a[1:], b[1:], strict=True))
    )
