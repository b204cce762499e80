"""The training engine: assembly of a run (``build_run``), the trainer loop, sharded evaluation, results files."""
from datkit.config import CHECKPOINT

from .evaluate import evaluate_accuracy, ra_attack
from .results import ResultsWriter, markdown_table
from .run import Run, adopt_model, build_model, build_run, teacher_config
from .trainer import Trainer

__all__ = ["Run", "Trainer", "adopt_model", "build_model", "build_run", "teacher_config", "CHECKPOINT",
           "evaluate_accuracy", "ra_attack", "ResultsWriter", "markdown_table"]
