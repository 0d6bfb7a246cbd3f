"""tensorflow-datasets builders over the local folders (manual_dir), prepared in the
array_record format and read back with tfds.data_source: no TensorFlow at any point.

One builder, `all_in_one`, with a config per layout (aio3, aio5, cdd11). Splits are per split
and task ("train_dehaze", "test_denoise", "train_haze_rain", ...), so training reads each
task's records directly. A record holds the original file bytes of the ground truth and of the
degraded image (empty for denoise training pairs, whose noise is added on the fly), the task,
the test-time sigma (0 when none) and the file's path relative to the root.

    python -m dod_jax.data.tfds_builder --root data/ --layout aio3 --data-dir ~/tensorflow_datasets

The folder is scanned and checked first (dod_jax.data.layouts); a folder with any problem is
refused with the full list before anything is written, and tfds writes into an `incomplete.*`
folder that only becomes the dataset when every split is done.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dod_jax.data.layouts import LAYOUT_TASKS, DataError, Pair, checked_pairs

NAME = "all_in_one"
VERSION = "1.0.0"


class AllInOne(tfds.core.GeneratorBasedBuilder):
    """All-in-one restoration pairs from a local folder in one of the standard layouts."""

    name = NAME
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=layout, description=f"{layout} folder layout")
                       for layout in sorted(LAYOUT_TASKS)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at a folder in the layout README.md documents."

    def __init__(self, *, pairs: dict[str, list[Pair]] | None = None, **kwargs):
        self._pairs = pairs  # {split: checked pairs}; given by prepare(), scanned once
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "gt": tfds.features.Tensor(shape=(), dtype=np.object_),
            "lq": tfds.features.Tensor(shape=(), dtype=np.object_),
            "task": tfds.features.Text(),
            "sigma": tfds.features.Scalar(dtype=np.float32),
            "name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        pairs = self._pairs or {split: checked_pairs(root, self.builder_config.name, split)
                                for split in ("train", "test")}
        generators = {}
        for split, split_pairs in pairs.items():
            for task in dict.fromkeys(p.task for p in split_pairs):
                generators[f"{split}_{task}"] = self._generate_examples(
                    root, [p for p in split_pairs if p.task == task])
        return generators

    def _generate_examples(self, root: Path, pairs: list[Pair]):
        for index, pair in enumerate(pairs):
            source = pair.lq if pair.lq is not None else pair.gt
            yield index, {
                "gt": pair.gt.read_bytes(),
                "lq": pair.lq.read_bytes() if pair.lq is not None else b"",
                "task": pair.task,
                "sigma": 0.0 if pair.sigma is None else pair.sigma,
                "name": str(source.relative_to(root)),
            }


def prepare(root: str | os.PathLike, layout: str, data_dir: str | os.PathLike) -> AllInOne:
    """Check `root` and write the array_record dataset under `data_dir`."""
    pairs = {split: checked_pairs(root, layout, split) for split in ("train", "test")}
    builder = AllInOne(config=layout, data_dir=str(data_dir), pairs=pairs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
                                 file_format="array_record")
    return builder


def task_sources(layout: str, data_dir: str | os.PathLike, split: str) -> dict[str, object]:
    """{task: random-access data source} of a prepared dataset, for pipeline.TrainBatches."""
    builder = AllInOne(config=layout, data_dir=str(data_dir))
    if not builder.is_prepared():
        raise DataError(f"{data_dir}: no prepared {NAME}/{layout} dataset (run prepare first)")
    return {name[len(split) + 1:]: builder.as_data_source(split=name)
            for name in builder.info.splits if name.startswith(split + "_")}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare an all-in-one data folder as array_record (TFDS).")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--layout", choices=sorted(LAYOUT_TASKS), required=True)
    parser.add_argument("--data-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    builder = prepare(args.root, args.layout, args.data_dir)
    for name, split in builder.info.splits.items():
        print(f"{name}: {split.num_examples} records")
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
