"""Semi-supervised AT (robust self-training, Carmon et al. 2019; DAT paper Table 3): a clean teacher trained on the
labeled part (``data.num_labeled``) pseudo-labels the rest, and training mixes both in every batch (``semisup.*``)."""
from .checks import semisup_config_errors
from .prepare import TEACHER, semisup_training_set
from .teacher import load_teacher, pseudo_label

__all__ = ["TEACHER", "semisup_config_errors", "semisup_training_set", "load_teacher", "pseudo_label"]
