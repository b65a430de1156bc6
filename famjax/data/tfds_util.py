"""Preparing a famjax tfds builder: no downloads, array_record, quiet."""
from __future__ import annotations

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Generates the builder's files unless they exist; tfds's progress bars stay off while it runs
    (they flood trainer logs) and come back as they were."""
    was_active = tqdm_utils._active  # pylint: disable=protected-access
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    finally:
        if was_active:
            tfds.enable_progress_bar()
