"""Adversarial attacks: ``attack(model, x, y) -> x_adv`` for inputs in [0, 1].

>>> atk = create_attack("pgd", eps=0.3, alpha=0.01, steps=40)
>>> x_adv = atk(model, x, y)   # pass the unwrapped (non-DDP) model

Registered names (``ATTACKS.names()``): ``"autoattack"``, ``"fgsm"``, ``"pgd"``.
"""
from __future__ import annotations

from typing import Any

from datkit.attacks.autoattack import AutoAttack
from datkit.attacks.base import ATTACKS, NORMS, Attack
from datkit.attacks.fgsm import FGSM, NoisyFGSM
from datkit.attacks.pgd import PGD


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build the attack registered as ``name`` (KeyError listing the known names if unknown)."""
    return ATTACKS.get(name)(**kwargs)


__all__ = ["ATTACKS", "NORMS", "Attack", "AutoAttack", "FGSM", "NoisyFGSM", "PGD", "create_attack"]
