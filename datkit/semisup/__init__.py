"""Semi-supervised AT (robust self-training, Carmon et al. 2019; DAT paper Table 3): a clean teacher trained on the
labeled part (``data.num_labeled``) pseudo-labels the rest, and training mixes both in every batch (``semisup.*``)."""
from .prepare import TEACHER, semisup_training_set
from .teacher import load_teacher, pseudo_label, train_teacher

__all__ = ["TEACHER", "semisup_training_set", "load_teacher", "pseudo_label", "train_teacher"]
