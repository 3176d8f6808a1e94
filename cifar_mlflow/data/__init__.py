"""Data: every dataset a run can use, as uint8 HWC numpy arrays, and the loaders that batch them.

The names below are the package's interface (`from cifar_mlflow import data; data.load_dataset(...)`); each lives
in the module that does its one job. The GPU-resident loader (`data.device_loader`) imports torch, so it is not
imported here: `import cifar_mlflow.data` stays as light as numpy.
"""

from cifar_mlflow.data.cifar_files import (
    ENCODINGS,
    IMAGE_BYTES,
    LAYOUT,
    META_FILE,
    TEST_FILE,
    TRAIN_FILES,
    read_batch,
    read_cifar10,
    read_class_names,
    read_layout,
    write_batch,
    write_layout,
    write_meta,
)
from cifar_mlflow.data.dataset import NUM_CLASSES, Dataset, Split
from cifar_mlflow.data.digits import (
    DIGITS_CLASSES,
    DIGITS_LAYOUT,
    DIGITS_SCALE,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_PER_CLASS,
    build_digits,
    digits_splits,
    digits_test_mask,
)
from cifar_mlflow.data.digits import is_current as digits_is_current
from cifar_mlflow.data.download import ARCHIVE, CIFAR10_MD5, CIFAR10_URL, URL_ENV, download_cifar10, safe_extract
from cifar_mlflow.data.sources import load_dataset
from cifar_mlflow.data.stats import array_digest, channel_stats, file_digest
from cifar_mlflow.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SIZES, make_synthetic, synthetic_dataset
from cifar_mlflow.data.worker_loader import EpochSampler, SplitDataset, auto_num_workers, make_loader, shutdown_workers
from cifar_mlflow.errors import DataError  # raised by every module here; callers catch data.DataError

__all__ = [
    "ARCHIVE",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DIGITS_CLASSES",
    "DIGITS_LAYOUT",
    "DIGITS_SCALE",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_PER_CLASS",
    "ENCODINGS",
    "IMAGE_BYTES",
    "LAYOUT",
    "META_FILE",
    "NUM_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SIZES",
    "TEST_FILE",
    "TRAIN_FILES",
    "URL_ENV",
    "DataError",
    "Dataset",
    "EpochSampler",
    "Split",
    "SplitDataset",
    "array_digest",
    "auto_num_workers",
    "build_digits",
    "channel_stats",
    "digits_is_current",
    "digits_splits",
    "digits_test_mask",
    "download_cifar10",
    "file_digest",
    "load_dataset",
    "make_loader",
    "make_synthetic",
    "read_batch",
    "read_cifar10",
    "read_class_names",
    "read_layout",
    "safe_extract",
    "shutdown_workers",
    "synthetic_dataset",
    "write_batch",
    "write_layout",
    "write_meta",
]
