"""The one typed configuration schema of datkit (omegaconf structured config).

Every field carries a comment that is its documentation (continued on the comment lines right below it);
``datkit.config.docs.markdown()`` turns these dataclasses into the config reference. The distributed and the
certified sections live in :mod:`.schema_distributed` and :mod:`.schema_certified`. YAML files in ``configs/`` and
command-line ``key=value`` overrides are merged onto these defaults; unknown keys and wrong types
fail at start-up (``datkit.config.load``), impossible values fail in ``datkit.config.validate``.

The defaults are the main job: PGD-5 adversarial training (DAT objective, lam=0.25) of ``cnn_small``
on the embedded offline MNIST data (``mnist5k``) at eps 0.4 ramped over 5 epochs, 24 epochs, global
batch 128, Adam 3e-3 with cosine decay (chosen on mnist5k's held-out split: configs/search/main_job.txt); RA is
PGD-20 at eps 0.3 (training at a larger eps than the test eps is the usual MNIST recipe, as in IBP/CROWN-IBP).
Evaluated on the official MNIST test set when ``../shared/data`` exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schema_certified import BoundsConfig, SmoothingConfig
from .schema_distributed import CompressionConfig, DeepSpeedConfig, DistConfig

__all__ = ["AttackConfig", "BoundsConfig", "CompressionConfig", "Config", "DataConfig", "DeepSpeedConfig", "DistConfig",
           "EvalConfig", "LogConfig", "MethodConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "SemisupConfig",
           "SmoothingConfig", "TrainConfig"]


@dataclass
class DataConfig:
    """What to train and evaluate on. Inputs are always tensors in [0, 1]."""

    name: str = "mnist5k"  # training set: mnist5k | digits | mnist | cifar10 | cifar100 | svhn | imagenet |
    # tinyimagenet | your own: MODULE:CALLABLE returning (train_set, test_set)
    kwargs: dict[str, Any] = field(default_factory=dict)  # MODULE:CALLABLE data only: keyword arguments of the call,
    # e.g. {n: 1000}
    mean: list[float] | None = None  # per-channel mean the model normalizes with; null = the registered dataset's
    # (MODULE:CALLABLE data: none, i.e. 0)
    std: list[float] | None = None  # per-channel std the model normalizes with; null = the registered dataset's
    # (MODULE:CALLABLE data: none, i.e. 1)
    root: str = "data"  # folder of torchvision / ImageFolder datasets (not used by mnist5k, digits)
    download: bool = False  # let torchvision download `name` into `root` (needs internet)
    test: str = "auto"  # evaluation set: auto (official MNIST test set if found for MNIST data, else the held-out
    # split) | split | mnist
    shared_root: str = "../shared/data"  # where the official MNIST test set (MNIST/raw/t10k-*.gz) is looked for;
    # relative to the working directory
    augment_shift: int = 0  # random translation by up to this many pixels (in-memory datasets: mnist5k, digits); 0 =
    # off
    num_workers: int = 0  # DataLoader worker processes per training process (embedded datasets need none)
    resize: int = 0  # resize every image (train and test) to resize x resize pixels, bilinear, e.g. 28 for digits -> an
    # MNIST model; 0 = native size
    num_labeled: int = 0  # keep the labels of only this many training examples (class-balanced, seeded); the rest is
    # unlabeled (see semisup.*); 0 = all labeled


@dataclass
class ModelConfig:
    """Which network; normalization to the dataset's mean/std is built into the model."""

    name: str = "cnn_small"  # cnn_small | cnn_4layer | cnn_madry | cnn_7layer_bn | preact_resnet18 | wide_resnet |
    # resnet50 | certified training: wide_resnet_8 | resnext | 64x64: cnn_7layer_bn_imagenet64 | wide_resnet_imagenet64
    # | resnext_imagenet64 (see datkit.models) | torchvision:NAME | timm:NAME | your own: MODULE:CALLABLE(num_classes=,
    # in_channels=, image_size=, **kwargs)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm across workers (batch statistics over the global batch)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. {depth: 28, widen_factor:
    # 10} for wide_resnet


@dataclass
class AttackConfig:
    """The attack used to generate training examples (methods pgd / fgsm / nfgsm / trades, and the PGD point of
    mtl-ibp / cc-ibp / sabr); ``attack.eps`` is also the eps every method trains up to."""

    eps: float = 0.4  # training perturbation budget in pixel units ([0,1] inputs), e.g. 0.3 MNIST, 8/255 CIFAR (the
    # main job trains at 0.4, evaluates at eval.eps=0.3)
    alpha: float | None = None  # step size; null = 2.5*eps/steps for PGD (Madry), 1.25*eps for FGSM (Wong et al.),
    # eps for N-FGSM
    steps: int = 5  # PGD iterations (ignored by fgsm)
    norm: str = "linf"  # linf | l2
    random_start: bool = True  # start from a uniform random point in the eps-ball
    eps_warmup_epochs: float = 5.0  # ramp eps linearly from 0 to `eps` over this many epochs (0 = no ramp)
    eval_mode: bool = False  # generate training attacks with the model in eval mode (BatchNorm statistics frozen)
    noise_mult: float = 2.0  # nfgsm only: the noise is U(-k*eps, k*eps) with k = noise_mult (de Jorge et al. 2022)


@dataclass
class MethodConfig:
    """What one training step minimizes."""

    name: str = "pgd"  # clean | pgd | fgsm | nfgsm (N-FGSM: noise 2*eps, step eps, no clipping) | trades | smoothing
    # (Gaussian noise, see smoothing.*) | ibp | crown-ibp | mtl-ibp | cc-ibp | sabr (certified training, see bounds.*) |
    # your own: MODULE:CALLABLE(cfg) -> datkit.methods.Method
    lam: float = 0.25  # DAT objective lam*loss(clean) + loss(adversarial); 0 = Madry AT
    beta: float = 6.0  # trades only: weight of the KL robustness term


@dataclass
class OptimConfig:
    """Optimizer and the linear scaling rule."""

    name: str = "adam"  # sgd | adam | lalr (DAT's layer-wise adaptive learning rate, see lalr_base, c_l, c_u) |
    # onebit_adam | onebit_lamb (1-bit Adam / 1-bit LAMB: frozen variance and compressed momentum after freeze_step) |
    # your own: MODULE:CALLABLE(params, lr, optim_cfg) -> torch.optim.Optimizer
    lr: float = 3e-3  # learning rate at `base_batch_size` (before linear scaling, if enabled)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # L2 weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, lalr (base adam), onebit_adam, onebit_lamb
    scale_lr: bool = False  # linear scaling rule (Goyal et al. 2017): lr *= global_batch / base_batch_size
    base_batch_size: int = 256  # reference global batch size for `scale_lr`
    lalr_base: str = "adam"  # lalr only: adam | sgd -- the base direction u (Adam moments / momentum, weight decay
    # folded in) normalized per tensor
    c_l: float = 0.0  # lalr, onebit_lamb: lower clip of the trust coefficient tau = min(max(||theta||, c_l), c_u); each
    # tensor moves tau*lr per step
    c_u: float = 10.0  # lalr, onebit_lamb: upper clip of tau (DAT authors' code: [0, 10])
    lalr_exclude: str = "bias_and_norm"  # lalr, onebit_lamb: bias_and_norm (tensors with ndim <= 1 get the plain base
    # update, no trust ratio) | none
    freeze_step: float = 0.25  # onebit_adam / onebit_lamb: uncompressed warm-up steps before the variance freezes and
    # the momentum is compressed; a value in (0, 1) is that fraction of the run's optimizer steps
    onebit_block_size: int = 1024  # onebit_adam / onebit_lamb: elements per float32 scale of the 1-bit momentum codec
    # (multiple of 8)
    onebit_variance_floor: float = 0.01  # onebit_adam / onebit_lamb: after the freeze, each tensor's variance is
    # floored at this fraction of its mean (a unit that never fired during the warm-up would otherwise step by
    # lr*m/eps); 0 = Tang et al.'s update
    onebit_error_feedback: bool = True  # onebit_adam / onebit_lamb: error feedback on the worker and the server side
    # (false: plain scaled signs, for comparison)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every optimizer step."""

    name: str = "cosine"  # constant | step | cosine
    warmup_epochs: float = 0.0  # linear warm-up from 0 over this many epochs
    milestones: list[float] = field(default_factory=list)  # step only: epochs at which lr *= gamma
    gamma: float = 0.1  # step only: decay factor
    min_lr_ratio: float = 0.0  # cosine only: final lr as a fraction of the peak


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 24  # number of passes over the training set
    batch_size: int = 128  # GLOBAL batch per optimizer step; must be divisible by world_size * grad_accum
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    grad_clip: float = 0.0  # clip the global gradient norm to this value (0 = off)
    seed: int = 0  # seed of model init, data order and attack noise
    max_steps: int = 0  # stop an epoch after this many steps (0 = full epochs); for smoke tests
    resume: bool = False  # continue from output_dir/checkpoint_last.pt if it exists
    checkpoint_every: int = 1  # save a checkpoint every N epochs (0 = only the final one)
    checkpoint_every_steps: int = 0  # also save a mid-epoch checkpoint every N optimizer steps (counted from the run's
    # start; 0 = off); resume continues at the next step exactly. SIGUSR1/SIGTERM always write one and exit with code 75
    # (docs/preemption.md)
    output_dir: str = "runs/${path_safe:${data.name}}_${path_safe:${method.name}}"  # where results, logs and
    # checkpoints go (path_safe: an import path's ':' becomes '-')
    threads: int = 0  # CPU intra-op threads per worker; 0 = auto: OMP_NUM_THREADS if set, else cores / workers on this
    # host
    malloc_tuning: bool = True  # glibc: keep freed memory in the process (fewer page faults, ~10% faster CPU steps)
    init_from: str | None = None  # fine-tuning: start from this datkit checkpoint's weights (the last Linear layer
    # is replaced when the number of classes differs); null = from scratch
    new_head: bool = False  # init_from: re-initialize the last Linear layer even when the number of classes matches
    freeze_backbone: bool = False  # init_from: train only the last Linear layer (every other parameter frozen)
    nonfinite: str = "stop"  # a NaN/Inf loss or gradient on any worker, found on every worker at the same step (before
    # compression): stop = exit with code 4; skip = drop that step (no optimizer step), counted in results.json; ignore
    # = no check (a NaN reaches the weights)
    max_nonfinite_skips: int = 10  # nonfinite=skip: stop (exit code 4) after this many consecutive skipped steps


@dataclass
class EvalConfig:
    """Per-epoch and final evaluation: TA (clean) and RA (PGD)."""

    every: int = 5  # evaluate every N epochs (the last epoch is always evaluated)
    num_samples: int = 500  # test examples used per evaluated epoch (0 = all); the final evaluation uses
    # `final_num_samples`
    final_num_samples: int = 0  # test examples for the final evaluation (0 = all)
    batch_size: int = 500  # evaluation batch (global; split across workers)
    eps: float | None = 0.3  # RA budget; null = attack.eps
    pgd_steps: int = 20  # PGD iterations of the RA attack
    pgd_alpha: float | None = None  # RA step size; null = 2.5*eps/pgd_steps
    pgd_restarts: int = 1  # random restarts of the RA attack
    robust: bool = True  # evaluate RA (PGD) next to TA; false = TA only (the semi-supervised teacher's runs)
    aa_samples: int = 500  # final evaluation: AA (standard AutoAttack through torchattacks, at eval.eps) on this many
    # test examples (a seeded subset; only PGD-robust ones are attacked, sharded evenly); 0 = off. Needs pip install
    # "datkit[autoattack]"
    co_samples: int = 128  # catastrophic-overfitting check after every epoch: PGD-10 accuracy (and the accuracy under
    # the method's own attack) at eval.eps on this many fixed TRAINING examples (not the test set); 0 = off
    co_drop: float = 0.2  # the check fires when that accuracy falls more than this below its best so far (Wong et al.
    # 2020 early stopping) or lies more than this below the accuracy under the method's own training attack
    co_action: str = "stop"  # when the check fires: stop (end training after this epoch; results.json says so) | warn
    # (print, record it, go on)


@dataclass
class LogConfig:
    """What gets printed and written."""

    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # write TensorBoard events to output_dir/tb
    plot: bool = True  # write output_dir/curves.png


@dataclass
class SemisupConfig:
    """Semi-supervised AT (robust self-training, Carmon et al. 2019; DAT paper Table 3): pseudo-label the unlabeled
    part of the training set (data.num_labeled) with a clean teacher, then train on both."""

    enabled: bool = False  # use the unlabeled examples with the teacher's pseudo-labels (needs data.num_labeled > 0);
    # false = labeled examples only
    teacher: str = "train"  # train: a clean teacher on the labeled examples first (saved as output_dir/teacher.pt) |
    # path to a datkit checkpoint
    teacher_epochs: int = 20  # teacher=train: epochs of clean training on the labeled examples (optim.*, schedule.*,
    # train.batch_size)
    unlabeled_fraction: float = 0.5  # fraction of every global batch drawn from the pseudo-labeled examples (Carmon et
    # al.: 0.5)
    num_unlabeled: int = 0  # use this many unlabeled examples (a seeded subset); 0 = all of them


@dataclass
class Config:
    """Root of the configuration."""

    backend: str = "auto"  # auto | torch | horovod | deepspeed; auto picks from the launcher's environment
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    semisup: SemisupConfig = field(default_factory=SemisupConfig)
