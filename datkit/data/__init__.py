"""Data: embedded offline datasets, torchvision datasets, the official MNIST test set, distributed sampling.

Inputs are always float tensors in [0, 1]; normalization lives inside the model.
"""
from . import embedded, torchvision_sets  # noqa: F401  (register the datasets)
from .augment import random_shift
from .checks import data_config_errors
from .labeled import balanced_split, dataset_labels, split_labeled
from .loaders import TEST_CHOICES, DataBundle, build_data, dataset_spec, eval_subset, iterate_batches, resolve_test_set
from .mixed import MixedBatchSampler
from .official_mnist import load_official_mnist_test, official_mnist_available
from .resize import resize_dataset, resize_images
from .sampler import ShardedBatchSampler, shard_range
from .spec import DATASETS, DatasetSpec, register_dataset
from .user import user_data_spec

__all__ = ["data_config_errors", "user_data_spec", "balanced_split", "dataset_labels", "split_labeled", "dataset_spec",
           "MixedBatchSampler", "resize_dataset", "resize_images", "random_shift", "DATASETS", "DatasetSpec",
           "register_dataset", "DataBundle", "build_data", "iterate_batches", "eval_subset",
           "resolve_test_set", "TEST_CHOICES", "ShardedBatchSampler", "shard_range", "load_official_mnist_test",
           "official_mnist_available"]
