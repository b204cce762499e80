"""The semi-supervised recipe's own config checks (``semisup.*``)."""
from __future__ import annotations

from datkit.config import at_least


def semisup_config_errors(cfg) -> list[str]:
    """``semisup.teacher_epochs >= 1``, ``num_unlabeled >= 0``, ``unlabeled_fraction`` in (0, 1), and ``enabled`` only
    with ``data.num_labeled > 0``."""
    ss, errors = cfg.semisup, []
    at_least(errors, "semisup.teacher_epochs", ss.teacher_epochs, 1)
    at_least(errors, "semisup.num_unlabeled", ss.num_unlabeled, 0)
    if not 0.0 < ss.unlabeled_fraction < 1.0:
        errors.append(f"semisup.unlabeled_fraction={ss.unlabeled_fraction!r} must be in (0, 1) "
                      f"(the share of every batch that is pseudo-labeled)")
    if ss.enabled and cfg.data.num_labeled <= 0:
        errors.append("semisup.enabled=true needs data.num_labeled > 0 (the labeled part; the rest of the training "
                      "set is pseudo-labeled)")
    return errors
