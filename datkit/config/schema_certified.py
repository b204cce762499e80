"""The certified-robustness sections of the configuration schema: ``smoothing`` (randomized smoothing: Gaussian
training and certification) and ``bounds`` (certified training with bound propagation and the verification cascade).
Part of :mod:`datkit.config.schema` (the root ``Config`` holds them); every field's comment is its documentation in
the generated config reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RADII = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)  # smoothing.radii's default


@dataclass
class SmoothingConfig:
    """Randomized smoothing (Cohen et al. 2019): Gaussian-noise training (method smoothing) and certification
    (python -m datkit.certify)."""

    sigma: float = 0.25  # std of the Gaussian noise in pixel units ([0,1] inputs); training noise and certified sigma
    # (Table 2: 0.12, 0.25)
    num_noise: int = 1  # method smoothing: noise samples per training input (the loss is averaged over them)
    adv_steps: int = 0  # method smoothing: PGD steps of SmoothAdv (Salman et al. 2019) on the smoothed classifier; 0 =
    # Gaussian augmentation only
    adv_eps: float = 0.25  # SmoothAdv l2 radius (step 2*adv_eps/adv_steps), ramped like attack.eps over
    # attack.eps_warmup_epochs
    n0: int = 100  # certify: noise samples to select the top class
    n: int = 100000  # certify: noise samples to estimate its probability (Cohen et al.: 100,000)
    alpha: float = 0.001  # certify: failure probability of the Clopper-Pearson bound (the certificate holds with prob.
    # >= 1-alpha)
    batch_size: int = 1000  # certify: noisy copies of one image per forward pass
    num_samples: int = 500  # certify: test images (a fixed seeded subset; 0 = all)
    seed: int = 0  # certify: the noise of test image i depends only on (seed, i), not on the worker or the batch
    radii: list[float] = field(default_factory=lambda: list(RADII))  # certify: l2 radii of the certified-accuracy
    # table (DAT paper Table 2)


@dataclass
class BoundsConfig:
    """Certified training with bound propagation (methods ibp / crown-ibp / mtl-ibp / cc-ibp / sabr; Shi et al. 2021)
    and verified accuracy (VA)."""

    engine: str = "native"  # native (datkit.certify.bounds) | auto_lirpa (needs auto_LiRPA installed from source;
    # PyPI's 0.3 does not run on current torch)
    eps_schedule: str = "smoothed"  # linear | smoothed: ramp of the training eps (attack.eps is its maximum;
    # attack.eps_warmup_epochs is not used)
    eps_start: float = 1.0  # epochs at eps = 0 before the ramp (the papers' 1-based start=2 is 1 here)
    eps_length: float = 20.0  # epochs of the ramp from 0 to attack.eps
    init: str = "ibp"  # ibp (w ~ N(0, 2*pi/fan_in^2), Shi et al. 2021) | default (the model's own initialization)
    reg_lambda: float = 0.5  # weight lambda of the warm-up regularizers, applied as lambda*(1 - eps_t/eps_max); 0 =
    # vanilla IBP
    reg_tol: float = 0.5  # tolerance tau of the tightness and ReLU-balance regularizers
    reg_terms: list[str] = field(default_factory=lambda: ["tightness", "relu"])  # which warm-up regularizers:
    # tightness, relu
    alpha: float = 0.5  # mtl-ibp: alpha * (IBP loss) + (1 - alpha) * (loss at a PGD point); cc-ibp: the loss of alpha *
    # (IBP margin bounds) + (1 - alpha) * (margins at the PGD point); in [0, 1]; 1 = IBP, 0 = PGD training (De Palma et
    # al., ICLR 2024)
    lambda_box: float = 0.4  # sabr only: IBP over a box of radius lambda_box * eps_t around a PGD point pulled into the
    # (1 - lambda_box) * eps_t box, in (0, 1]; 1 = IBP (Mueller et al., ICLR 2023)
    beta_final: float = 0.0  # crown-ibp: the weight of CROWN-IBP in beta * CROWN-IBP + (1 - beta) * IBP goes from 1 to
    # beta_final over the eps ramp and stays there (Zhang et al. 2020's beta_end); 0 = IBP after the ramp, in [0, 1]
    loss_fusion: bool = True  # crown-ibp: bound the cross-entropy itself with one backward row (Xu et al. 2020) instead
    # of one per margin; native engine only (with engine=auto_lirpa set false); false = the margin form
    verify: Any = field(default_factory=lambda: ["ibp"])  # verification cascade of VA at eval.eps: a list of stages
    # from ibp, crown-ibp, crown (full CROWN), each run on the examples the earlier ones left unverified, e.g. [ibp,
    # crown-ibp, crown]; legacy strings ibp = [ibp], crown-ibp = [ibp, crown-ibp]
