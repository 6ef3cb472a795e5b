"""An operator's dataset plugin, as README "Distilling your own images" shows: loaded by the test server through
DISTILL_PLUGINS, it registers the ImageFolder tree at $INTERFACES_TEST_FOLDER under the name ``tiny-folder``."""

from __future__ import annotations

import os

from distill.data.registry import DATASETS, DatasetSpec, get_dataset

DATASETS["tiny-folder"] = DatasetSpec(
    "tiny-folder", "a small ImageFolder tree registered by an operator plugin", channels=3, image_size=16,
    num_classes=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    loader=lambda: get_dataset(f"imagefolder:{os.environ['INTERFACES_TEST_FOLDER']}"))
