"""The training engine: trainer loop, sharded evaluation, results files."""
from .evaluate import evaluate_accuracy, ra_attack
from .results import ResultsWriter, markdown_table
from .trainer import CHECKPOINT, Trainer, build_model

__all__ = ["Trainer", "build_model", "CHECKPOINT", "evaluate_accuracy", "ra_attack", "ResultsWriter", "markdown_table"]
