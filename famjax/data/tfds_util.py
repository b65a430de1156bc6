"""Preparing a famjax tfds builder: no downloads, array_record, quiet."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

BuilderT = TypeVar("BuilderT", bound=tfds.core.DatasetBuilder)


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The DatasetInfo of a dataset famjax generates on the machine (PassKey, local text): no GCS lookup.

    tfds looks for a builder's metadata in its GCS bucket whenever the builder's files are not written yet; it
    first creates a temporary folder for them and never removes it, even with GCS access off (as without
    TensorFlow), so every fresh dataset left an empty folder in the system's temp directory. famjax's datasets
    are never in that bucket.
    """

    def initialize_from_bucket(self) -> None:
        return None


def _not_custom_config_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config():
    """Drops tfds's "Using custom data configuration: ..." warning while famjax opens its builders: their
    configs are always custom (named from a digest), so the warning would be a stderr line on every run."""
    logger = logging.getLogger("absl")  # tfds logs through absl.logging, whose Python logger is "absl"
    logger.addFilter(_not_custom_config_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_custom_config_warning)


def prepare(make_builder: Callable[[], BuilderT]) -> BuilderT:
    """Returns `make_builder()` with its files generated unless they exist; tfds's progress bars stay off
    while it runs (they flood trainer logs) and come back as they were.

    Several processes may prepare the same dataset at once (hosts sharing a data_dir, parallel runs): tfds
    writes into a private folder and renames it into place, so all but the first rename fail with
    FileExistsError. The loser then opens a fresh builder on the files the winner wrote.
    """
    with _quiet_custom_config():
        builder = make_builder()
    was_active = tqdm_utils._active  # pylint: disable=protected-access
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    except FileExistsError:
        with _quiet_custom_config():
            builder = make_builder()  # another process finished first: its files are complete
        if not builder.is_prepared():
            raise
    finally:
        if was_active:
            tfds.enable_progress_bar()
    return builder
