"""AutoAttack (Croce & Hein, ICML 2020) through torchattacks, behind datkit's call convention."""
from __future__ import annotations

import numbers
from types import ModuleType

import torch
from torch import nn

from datkit.attacks.base import ATTACKS, Attack, _check_choice, _check_int, project

VERSIONS: tuple[str, ...] = ("standard", "plus", "rand")
_TA_NORMS = {"linf": "Linf", "l2": "L2"}


class _ModeLocked(nn.Module):
    """Forwards to ``model`` but ignores ``train()``/``eval()``, so torchattacks, which switches the
    model it is given to eval and back, runs the model in exactly the mode datkit set."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> _ModeLocked:
        return self


def _import_torchattacks() -> ModuleType:
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(
            'AutoAttack needs torchattacks: pip install "datkit[autoattack]" (or pip install torchattacks)'
        ) from err
    return torchattacks


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack from "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks" (Croce & Hein, ICML 2020), run by ``torchattacks.AutoAttack``.

    Norm: ``"linf"`` or ``"l2"``. ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square;
    per sample, the first attack that succeeds is kept. Inputs must lie in [0, 1] and be image
    batches of shape ``(N, C, H, W)`` (Square needs them); the model must output ``n_classes`` logits.

    Args:
        eps: radius of the ball (default 0.3).
        norm: ``"linf"`` (default) or ``"l2"``.
        version: ``"standard"`` (default), ``"plus"`` or ``"rand"``.
        n_classes: number of classes of the model (default 10).
        seed: seed of the attacks' random starts (default 0; None: time-based). The global RNG
            state is saved and restored around the attack, so the seeding does not leak out.
        eval_mode: switch the model to eval mode during the attack (default False: keep its mode;
            torchattacks itself would always switch to eval).
        verbose: let torchattacks print progress (default False).

    Requires ``pip install "datkit[autoattack]"``. Parameters' ``requires_grad`` is switched off
    during the attack (FAB calls ``.backward()``), so parameter ``.grad`` is never touched.
    """

    def __init__(
        self,
        eps: float = 0.3,
        norm: str = "linf",
        version: str = "standard",
        n_classes: int = 10,
        seed: int | None = 0,
        *,
        eval_mode: bool = False,
        verbose: bool = False,
    ) -> None:
        super().__init__(eps, norm=norm, eval_mode=eval_mode)
        self.version = _check_choice("version", version, VERSIONS)
        self.n_classes = _check_int("n_classes", n_classes, minimum=2)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self.verbose = bool(verbose)
        self._torchattacks = _import_torchattacks()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (N, C, H, W) for AutoAttack, got shape {tuple(x.shape)}")
        attack = self._torchattacks.AutoAttack(
            _ModeLocked(model), norm=_TA_NORMS[self.norm], eps=self.eps, version=self.version,
            n_classes=self.n_classes, seed=self.seed, verbose=self.verbose,
        )
        attack.set_device(x.device)
        params = [p for p in model.parameters() if p.requires_grad]
        cuda_devices = {torch.cuda.current_device()} if torch.cuda.is_initialized() else set()
        if x.is_cuda:
            cuda_devices.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=sorted(cuda_devices)):
                x_adv = attack(x, y)
        finally:
            for p in params:
                p.requires_grad_(True)
        # torchattacks' outputs are in the ball already; project away any rounding excess.
        return project(x_adv.detach().to(device=x.device, dtype=x.dtype), x, self.eps, self.norm)

    def _repr_args(self) -> dict[str, object]:
        return {**super()._repr_args(), "version": self.version, "n_classes": self.n_classes, "seed": self.seed}
