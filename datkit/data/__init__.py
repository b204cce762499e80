"""Data: embedded offline datasets, torchvision datasets, the official MNIST test set, distributed sampling.

Inputs are always float tensors in [0, 1]; normalization lives inside the model.
"""
from . import embedded, torchvision_sets  # noqa: F401  (register the datasets)
from .augment import random_shift
from .loaders import TEST_CHOICES, DataBundle, build_data, eval_subset, iterate_batches, resolve_test_set
from .official_mnist import load_official_mnist_test, official_mnist_available
from .sampler import ShardedBatchSampler, shard_range
from .spec import DATASETS, DatasetSpec, register_dataset

__all__ = ["random_shift", "DATASETS", "DatasetSpec", "register_dataset", "DataBundle", "build_data", "iterate_batches", "eval_subset",
           "resolve_test_set", "TEST_CHOICES", "ShardedBatchSampler", "shard_range", "load_official_mnist_test",
           "official_mnist_available"]
