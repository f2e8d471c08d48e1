"""The compression pipeline behind ``slimcnn compress`` and ``slimcnn demo``.

evaluate base -> ``method.prepare`` -> train with the method's hooks (``method_epochs``) -> evaluate ->
``method.finalize`` (physically smaller model) -> evaluate -> BatchNorm recalibration (``bn_recalib`` batches,
the same for every method and peer) -> evaluate -> fine-tune (``epochs``) -> evaluate, profile and time both
models side by side -> report.

One budget: a user thinks "compress this in N epochs", so ``slimcnn compress --epochs N`` is the whole run and
each method's recipe (:attr:`Method.method_share <slimcnn.methods.base.Method.method_share>`) decides how much of
it trains with the method attached; :func:`split_budget` turns the two into ``method_epochs`` + ``epochs``
(fine-tune), the fields this module works with. A method whose finalize needs training and is left with none
is an error, never a silent finalize on untrained gates or clusters.

Under torchrun (``torchrun --nproc_per_node N -m slimcnn compress ...``) the training phases run in DDP on
sharded data (the engine's trainer), every rank evaluates the whole unsharded test split (so every rank computes the
same figures without communication), and every rank adopts rank 0's model where ranks could part
(:func:`slimcnn.engine.replicas.adopt_rank0`: before finalize, after finalize and BN recalibration, after the
fine-tune); report.json's ``ddp`` records whether the ranks ended bit-identical. Rank 0 alone times and writes.

``cfg.task = "segmentation"`` scores by mean IoU (``miou`` in place of ``top1`` in the report) and fine-tunes with the
pixel-wise loss (void ignored), with the methods that declare :attr:`~slimcnn.methods.base.Method.segmentation`.

The pipeline knows no method by name: what it passes and records follows each method's class attributes
(:class:`~slimcnn.methods.base.Method`: ``prepare_inputs``, ``finalize_key``, ``layer_control``, ...).

Two optional levers: distillation from the uncompressed base (``distill``; the teacher is a frozen copy of the
base, used in the method phase and in the fine-tune) and a weight EMA in the fine-tune (``ema``; the averaged
weights are what is evaluated and saved). ``CompressConfig`` leaves both off, so that a caller's figures never
change under it; the ``slimcnn compress`` command turns distillation on (``--no-distill`` to drop it) because it
measured best at the cpu budget: on ResNet-56 at 0.5 MACs it raised every row, ours and the peers'
(``benchmarks/results/bench-cpu-resnet56.md``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from .engine import TrainConfig
from .graph.policy import LayerPolicy, layer_policy
from .methods.base import Method, within_tol
from .profile import budgeted_latency, profile
from .progress import bar as progress_bar
from .report import alignment, environment, layer_widths, write_report

if TYPE_CHECKING:
    from .distill import Distiller

#: what each task is scored by in the report: top-1 or mean IoU, both in percent
METRICS = {"classification": "top1", "segmentation": "miou"}


@dataclass
class CompressConfig:
    """Settings of one compression run. ``method_epochs + epochs`` is its whole epoch budget; build the two
    from one total with :func:`split_budget`."""

    target_macs: float | None = 0.5
    method_epochs: int = 0          # training with the method's hooks before finalize (C-SGD, TRP, Dagger search)
    epochs: int = 0                 # fine-tune after finalize
    lr: float = 0.01                # fine-tune learning rate
    method_lr: float | None = None  # learning rate with the method's hooks (default: lr)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    task: str = "classification"    # or "segmentation": mIoU in the report, pixel-wise loss (see METRICS)
    out_dir: str | None = None
    latency_batches: list[int] = field(default_factory=lambda: [1, 128])
    latency_repeats: int = 12       # at most; fewer when the time budget runs out
    latency: bool = True            # time base and compressed model (False: --no-latency)
    latency_budget_s: float = 5.0   # seconds of timing per batch size (a larger batch is shrunk to fit)
    latency_backend: str = "eager"  # where base and compressed are timed: eager (on ``device``) or onnxruntime
    exclude: list[str] = field(default_factory=list)            # layers never pruned (globs; graph/policy.py)
    min_keep: dict[str, float] = field(default_factory=dict)    # glob -> floor on the kept fraction of channels
    bn_recalib: int = 100           # batches of BatchNorm recalibration after finalize (0: none)
    stage_evals: bool = True        # also score before finalize, raw after it and after BN recalibration (False:
                                    # the compressed model is scored once, at the end; the demo, to save 12 of 19 evals)
    distill: bool = False           # distil from the uncompressed base in the method phase and the fine-tune
    kd_alpha: float = 0.7           # weight of the distillation term (1 - kd_alpha: cross-entropy)
    kd_temperature: float = 4.0
    ema: float | None = None        # weight-EMA decay in the fine-tune (None: off)
    round_to: int | None = None     # kept widths in multiples of this (the method's own round_to); for the report

    def __post_init__(self) -> None:
        if self.method_epochs < 0 or self.epochs < 0:
            raise ValueError(f"epochs cannot be negative (method {self.method_epochs}, fine-tune {self.epochs})")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")
        if self.task not in METRICS:
            raise ValueError(f"task must be one of {', '.join(METRICS)}, got {self.task!r}")

    @property
    def distils(self) -> bool:
        """Whether a teacher takes part: distillation asked for, and some epoch trains."""
        return self.distill and bool(self.method_epochs or self.epochs)

    def method_budget(self, steps_per_epoch: int, epochs: int | None = None) -> dict[str, Any]:
        """What a method's ``prepare`` may take about its training (``prepare_inputs``): the steps of ``epochs``
        (default ``method_epochs``) at ``steps_per_epoch``, the learning rate and the schedule."""
        epochs = self.method_epochs if epochs is None else epochs
        return {"total_steps": steps_per_epoch * epochs, "lr": self.method_lr or self.lr, "schedule": self.schedule}

    def train_config(self, epochs: int, lr: float | None = None, out_dir: str | Path | None = None,
                     ema: float | None = None) -> TrainConfig:
        """The :class:`~slimcnn.engine.TrainConfig` of one training phase of this run: ``epochs`` at ``lr``
        (default: the fine-tune rate) with the run's optimiser, schedule, seed, device and task.

        >>> CompressConfig(lr=0.02, seed=3).train_config(2).lr, CompressConfig(seed=3).train_config(2).seed
        (0.02, 3)
        """
        return TrainConfig(epochs=epochs, lr=self.lr if lr is None else lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, schedule=self.schedule, seed=self.seed, device=self.device,
                           amp=self.amp, out_dir=str(out_dir) if out_dir else None, ema=ema, task=self.task)

    @property
    def recipe(self) -> str:
        """The training recipe's name, as the benchmark labels its rows: ``plain`` or ``distill``."""
        return "distill" if self.distill else "plain"


def _method_class(method: Method | type[Method]) -> type[Method]:
    return method if isinstance(method, type) else type(method)


def check_task_support(method: Method | type[Method], task: str) -> None:
    """ValueError (one line) if ``method`` cannot compress a model of ``task``."""
    from .methods import methods_where

    cls = _method_class(method)
    if task == "segmentation" and not cls.segmentation:
        raise ValueError(f"{cls.name} is not supported for segmentation (methods that are: "
                         f"{', '.join(methods_where(lambda c: c.segmentation))})")


def split_budget(method: Method | type[Method], total_epochs: int, method_epochs: int | None = None
                 ) -> tuple[int, int]:
    """(epochs with the method attached, fine-tune epochs) for a budget of ``total_epochs``.

    The split follows the method's recipe (``method_share`` of the total, rounded, and at least one epoch for a
    method with a share > 0) unless ``method_epochs`` overrides it; the fine-tune gets the rest, so the two always
    add up to ``total_epochs``. Raises ValueError for a negative budget, an override larger than the budget, or
    a method that needs training before its finalize left with none.

    >>> from slimcnn.methods import method_class
    >>> [split_budget(method_class(name), 3) for name in ("csgd", "l1", "dagger")]
    [(3, 0), (0, 3), (2, 1)]
    """
    cls = _method_class(method)
    if total_epochs < 0:
        raise ValueError(f"the epoch budget cannot be negative, got {total_epochs}")
    if method_epochs is not None:
        if method_epochs < 0:
            raise ValueError(f"--method-epochs cannot be negative, got {method_epochs}")
        if method_epochs > total_epochs:
            raise ValueError(f"--method-epochs {method_epochs} is more than the whole budget --epochs {total_epochs} "
                             "(--epochs counts every epoch of the run, the method's included)")
        m = method_epochs
    else:
        m = round(total_epochs * cls.method_share)
        if cls.method_share > 0 and total_epochs > 0:
            m = max(1, m)
    if hasattr(cls, "stage_epochs"):  # a stack (methods/stack.py): each of its stages must get what it needs
        cls.stage_epochs(m)
    if cls.trains_before_finalize and m < 1:
        raise ValueError(_no_training_message(cls, total_epochs, method_epochs))
    return m, total_epochs - m


@dataclass(frozen=True)
class RunPlan:
    """A run checked once (:func:`plan_run`, :func:`check_run`): the method's class, the config with the budget
    split, the layer policy, and the phases ``compress`` walks, in order, with the ones this run skips left out."""

    method: type[Method]
    cfg: CompressConfig
    policy: LayerPolicy
    phases: tuple[str, ...]


def plan_run(method: Method | type[Method], epochs: int, method_epochs: int | None = None,
             **settings: Any) -> RunPlan:
    """The one check of a run, before anything loads: the method supports the task, the budget of ``epochs`` is
    split once by the method's recipe (:func:`split_budget`, ``method_epochs`` overriding it) and the method can
    obey the layer control asked (``exclude``, ``min_keep``); ``settings`` are the other
    :class:`CompressConfig` fields. The CLI, the benchmarks and the demo build every run through it; pass the
    plan to :func:`compress` in place of the config.

    >>> from slimcnn.methods import method_class
    >>> plan = plan_run(method_class("dagger"), 4, target_macs=0.5)
    >>> plan.cfg.method_epochs, plan.cfg.epochs, plan.phases[:4]
    (2, 2, ('measure base', 'prepare', 'train with the method (2 epochs)', 'finalize'))
    """
    cls = _method_class(method)
    check_task_support(cls, settings.get("task", "classification"))
    m, f = split_budget(cls, epochs, method_epochs)
    return check_run(cls, CompressConfig(method_epochs=m, epochs=f, **settings))


def check_run(method: Method | type[Method], cfg: CompressConfig) -> RunPlan:
    """The same check for a config built by hand (its split as given): ValueError (one line) if the method needs
    training before its finalize and ``cfg.method_epochs`` is 0, cannot compress ``cfg.task``, or cannot obey
    ``cfg.exclude`` / ``cfg.min_keep``."""
    cls = _method_class(method)
    if cls.trains_before_finalize and cfg.method_epochs < 1:
        raise ValueError(_no_training_message(cls, cfg.method_epochs + cfg.epochs, cfg.method_epochs))
    check_task_support(cls, cfg.task)
    return RunPlan(cls, cfg, check_layer_control(cls, cfg), _phase_names(cls, cfg))


def _phase_names(cls: type[Method], cfg: CompressConfig) -> tuple[str, ...]:
    """The phases of :func:`_compress` this run goes through, as report.json names them."""
    phases = ["measure base", "prepare"]
    if cfg.method_epochs:
        phases.append(f"train with the method ({cfg.method_epochs} epochs)")
    phases.append("finalize")
    if cfg.bn_recalib:
        phases.append("recalibrate BatchNorm")
    if cfg.epochs:
        phases.append(f"fine-tune ({cfg.epochs} epochs)")
    phases.append("measure compressed")
    if cfg.latency and cfg.latency_batches:
        phases.append("time latency")
    return tuple(phases)


def prepare_kwargs(method: Method | type[Method], cfg: CompressConfig, train_loader, test_loader=None,
                   val_loader=None) -> dict[str, Any]:
    """The keywords the pipeline hands ``method.prepare`` beyond the model and example input: those of its
    ``prepare_inputs`` among the method phase's budget (when that phase trains) and the offered loaders and config."""
    accepted = _method_class(method).prepare_inputs
    budget = cfg.method_budget(len(train_loader)) if cfg.method_epochs > 0 else {}
    # data-scored peers read train_loader; a stack runs its first stage whole inside prepare (methods/stack.py) and
    # needs the loaders and the run's settings
    offered = {"train_loader": train_loader, "test_loader": test_loader, "val_loader": val_loader, "cfg": cfg,
               **budget}
    return {k: v for k, v in offered.items() if k in accepted}


def _no_training_message(cls: type[Method], total: int, override: int | None) -> str:
    given = f"--method-epochs {override}" if override is not None else f"--epochs {total}"
    return (f"{cls.name} needs at least 1 epoch of {cls.method_phase} before it can finalize, and {given} leaves "
            f"it none; give it a budget, e.g. --epochs 2")


def recipe_text(method: Method | type[Method], cfg: CompressConfig) -> str:
    """The run's plan in one sentence, for report.md and the console."""
    cls = _method_class(method)
    parts = []
    if cfg.method_epochs:
        parts.append(f"{cfg.method_epochs} epoch(s) of {cls.method_phase}")
    parts.append("finalize")
    if cfg.bn_recalib:
        parts.append("BN recalibration")
    parts.append(f"{cfg.epochs} fine-tune epoch(s)" + (f" with weight EMA {cfg.ema}" if cfg.ema is not None
                                                        and cfg.epochs else ""))
    text = ", then ".join(parts)
    if cfg.distils:
        text += (f"; distilled from the uncompressed base (alpha {cfg.kd_alpha}, T {cfg.kd_temperature}) in every "
                 "training epoch")
    return text


def epoch_budget(method: Method | type[Method], cfg: CompressConfig) -> dict[str, Any]:
    """report.json's ``epoch_budget``: the total, how it was split and by which recipe."""
    cls = _method_class(method)
    return {"total_epochs": cfg.method_epochs + cfg.epochs, "method_epochs": cfg.method_epochs,
            "finetune_epochs": cfg.epochs, "method_share": cls.method_share, "method_phase": cls.method_phase,
            "recipe": cfg.recipe, "plan": recipe_text(cls, cfg)}


def _score(model: nn.Module, loader, cfg: CompressConfig, desc: str) -> tuple[float, torch.Tensor | None, int]:
    """(score, logits, images) on ``loader``: top-1 and the logits for classification (to compare the models
    around finalize output by output); for segmentation the mean IoU and no logits (a test split's per-pixel
    logits are too large to keep). The formulas are the engine's (slimcnn/engine/evaluate.py)."""
    from .engine.distributed import is_main
    from .engine.evaluate import evaluate, predict, top1

    if cfg.task == "segmentation":
        m = evaluate(model.to(cfg.device), loader, task="segmentation", device=cfg.device, progress=is_main())
        return round(m["miou"], 2), None, m["n"]
    logits, labels = predict(model, loader, cfg.device, desc, progress=is_main())
    return top1(logits, labels), logits, len(labels)


def _train(model: nn.Module, loader, cfg: CompressConfig, epochs: int, lr: float, method: Method | None,
           out: Path | None, distiller: Distiller | None = None, ema: float | None = None) -> nn.Module:
    from .engine import train

    return train(model, loader, cfg.train_config(epochs, lr, out, ema), method=method, distiller=distiller).model


def check_layer_control(method: Method | type[Method], cfg: CompressConfig, model: nn.Module | None = None
                        ) -> LayerPolicy:
    """The run's :class:`LayerPolicy`; ValueError if the method cannot obey it (its
    :attr:`~slimcnn.methods.base.Method.layer_control`) or a glob matches no layer."""
    from .methods import methods_where

    policy = LayerPolicy(tuple(cfg.exclude), tuple(cfg.min_keep.items()))
    cls = _method_class(method)
    asked = {k for k, v in (("exclude", cfg.exclude), ("min_keep", cfg.min_keep)) if v}
    missing = asked - cls.layer_control
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(missing))
        able = ", ".join(methods_where(lambda c: missing <= c.layer_control))
        raise ValueError(f"{cls.name} does not support {flags} (methods that do: {able})")
    if model is not None and policy:
        policy.check(model)
    return policy


def _excluded_shapes(model: nn.Module, policy: LayerPolicy) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of every excluded layer, to confirm after compression that none changed."""
    return {f"{n}.{k}": tuple(p.shape) for n, m in model.named_modules() if n and policy.excluded(n)
            for k, p in m.named_parameters(recurse=False)}


def runtime_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int, backend: str,
                    budget_s: float) -> tuple[dict[str, float], int, int]:
    """Median milliseconds of each model on ``backend`` (ONNX Runtime: each exported once), timed interleaved for
    about ``budget_s`` seconds: ``(ms per model, batch, repeats)``, as :func:`~slimcnn.profile.budgeted_latency`."""
    from .backends import budgeted_repeats, runner, time_runners

    runners = {k: runner(m, input_shape, batch, backend, torch.get_num_threads()) for k, m in models.items()}
    repeats = budgeted_repeats(runners, budget_s, min_repeats=3)
    return time_runners(runners, repeats), batch, repeats


def slower_than_base(latency_ms: dict[str, Any]) -> str | None:
    """The one-line warning for a compressed net that took longer than the base at any timed batch, else None.

    >>> timed = {"batch": [1, 128], "ratio": [1.22, 0.8], "device": "cpu"}
    >>> print(slower_than_base(timed))  # doctest: +NORMALIZE_WHITESPACE
    the compressed net is SLOWER than the base at batch 1 (1.220x the base's time), eager PyTorch on cpu: fewer MACs
    did not make it faster there
    >>> slower_than_base({"batch": [1], "ratio": [0.9], "device": "cpu"}) is None
    True
    """
    slow = [(b, r) for b, r in zip(latency_ms.get("batch", []), latency_ms.get("ratio", [])) if r > 1.0]
    if not slow:
        return None
    where = ", ".join(f"batch {b} ({r:.3f}x the base's time)" for b, r in slow)
    runtime = ("ONNX Runtime" if latency_ms.get("backend") == "onnxruntime" else
               f"eager PyTorch on {latency_ms.get('device', 'cpu')}")
    return f"the compressed net is SLOWER than the base at {where}, {runtime}: fewer MACs did not make it faster there"


def _layer_control_record(policy: LayerPolicy, model: nn.Module, compact: nn.Module,
                          input_shape: tuple[int, ...]) -> dict[str, Any]:
    """report.json's ``layer_control``: the globs, the groups they froze or floored, and the check that every
    excluded layer kept its shape (a SurgeryError if one did not: the user was promised it would)."""
    from .graph import channel_groups
    from .graph.validate import SurgeryError

    x = torch.zeros(1, *input_shape)
    with layer_policy(policy=policy):
        groups = channel_groups(copy.deepcopy(model).cpu().eval(), x)
    before, after = _excluded_shapes(model, policy), dict(_named_shapes(compact))
    changed = [k for k, v in before.items() if k in after and after[k] != v]
    gone = [k for k in before if k not in after]
    if changed or gone:
        raise SurgeryError(f"--exclude promised these layers would keep their shape, but {(changed + gone)[:3]} "
                           "changed")
    return {**policy.record(),
            "excluded_groups": [g.key for g in groups if "excluded:" in g.reason],
            "floors": {g.key: g.min_keep for g in groups if g.min_keep > 1},
            "excluded_layers": sorted({n.rsplit(".", 1)[0] for n in before}),
            "excluded_unchanged": True}


def _named_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    for n, p in model.named_parameters():
        yield n, tuple(p.shape)


def compress(model: nn.Module, method: Method, train_loader, test_loader, input_shape: tuple[int, ...],
             cfg: CompressConfig | RunPlan, model_name: str = "", info: dict[str, Any] | None = None,
             memo: dict | None = None, val_loader=None) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``model`` with ``method``; returns the compact model and the report (``model`` is untouched).

    ``cfg``: a :class:`RunPlan` (:func:`plan_run`: checked and split once, before anything loaded) or a
    :class:`CompressConfig` built by hand, which is checked here (:func:`check_run`). Only what needs the model is
    checked again: that the layer control's globs name layers of it.

    ``val_loader``: a validation split (e.g. ``cifar10_loaders(..., splits=("train", "val", "test"))``): every
    choice the method makes from accuracy (a stack's split) is made on it, and the report gives the base's and the
    compressed net's score on it beside the test split's (``val_<metric>``).

    Raises ValueError before any work if ``method`` needs training before finalize and ``cfg.method_epochs`` is 0,
    or if ``cfg.exclude`` / ``cfg.min_keep`` ask for a layer control the method lacks or name no layer.

    ``memo``: a dict kept by a caller that compresses the same ``model`` on the same loaders several times (the
    demo's rows, one per method): the base's profile and evaluation and, with ``cfg.distill``, the teacher's logits
    per batch are computed once and reused from it. Do not share one between different base models or test sets.
    """
    plan = cfg if isinstance(cfg, RunPlan) else check_run(method, cfg)
    if not isinstance(method, plan.method):
        raise ValueError(f"the run was planned for {plan.method.name}, not {method.name}")
    if plan.policy:
        plan.policy.check(model)
    with layer_policy(policy=plan.policy):  # every channel group the method builds, from prepare to finalize
        return _compress(model, method, train_loader, test_loader, input_shape, plan, model_name, info, memo,
                         val_loader)


@dataclass
class _Run:
    """What the phases of one compression run hand on: the inputs, the model each phase leaves, and what each
    phase recorded (``records``, from which the report is built)."""

    model: nn.Module
    method: Method
    cfg: CompressConfig
    loaders: dict[str, Any]
    input_shape: tuple[int, ...]
    out: Path | None
    memo: dict | None
    metric: str = "top1"
    distiller: Any = None
    work: nn.Module | None = None
    compact: nn.Module | None = None
    records: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.time)


def _compress(model: nn.Module, method: Method, train_loader, test_loader, input_shape: tuple[int, ...],
              plan: RunPlan, model_name: str, info: dict[str, Any] | None, memo: dict | None = None,
              val_loader=None) -> tuple[nn.Module, dict[str, Any]]:
    """The run as its phases, in order; each reads the run and records its own figures."""
    from .engine import distributed
    from .engine.replicas import adopt_rank0

    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    if distributed.world_size() > 1:  # every rank starts from rank 0's base (random init may differ per process)
        model, _ = adopt_rank0(copy.deepcopy(model))
    out = Path(cfg.out_dir) if cfg.out_dir and distributed.is_main() else None  # rank 0 alone writes
    run = _Run(model, method, cfg, {"train": train_loader, "test": test_loader, "val": val_loader}, input_shape,
               out, memo, METRICS[cfg.task])
    for phase in (_measure_base, _prepare, _train_method, _finalize, _recalibrate, _fine_tune, _measure_compressed,
                  _time_latency, _confirm_latency_goal):
        phase(run, info)
    report = _build_report(run, model_name, info, plan)
    if out:
        from .io import save

        save(run.compact, out)
        write_report(report, out, layer_widths(model), layer_widths(run.compact))
    return run.compact, report


def _measure_base(run: _Run, info: dict[str, Any] | None) -> None:
    cfg, memo = run.cfg, run.memo
    if memo is not None and "base" in memo:
        prof, score, images = memo["base"]
    else:
        prof = profile(run.model, run.input_shape)
        score, _, images = _score(run.model, run.loaders["test"], cfg, "eval base")
        if memo is not None:
            memo["base"] = (prof, score, images)
    run.records["base"] = {"profile": prof, "score": score, "test_images": images}
    tqdm.write(f"base: {run.metric} {score:.2f}  MACs {prof.macs / 1e6:.2f}M  params {prof.params / 1e6:.3f}M")
    tqdm.write(f"plan: {recipe_text(run.method, cfg)}")
    if cfg.distils:
        from .distill import Distiller

        # a frozen copy of the uncompressed base teaches both phases; the base itself stays untouched
        run.distiller = Distiller(copy.deepcopy(run.model).eval(), cfg.kd_alpha, cfg.kd_temperature,
                                  memo.setdefault("teacher_logits", {}) if memo is not None else None)


def _prepare(run: _Run, info: dict[str, Any] | None) -> None:
    example = torch.randn(2, *run.input_shape, generator=torch.Generator().manual_seed(run.cfg.seed))
    run.work = run.method.prepare(copy.deepcopy(run.model), example.to(run.cfg.device),
                                  **prepare_kwargs(run.method, run.cfg, run.loaders["train"], run.loaders["test"],
                                                   run.loaders["val"]))


def _train_method(run: _Run, info: dict[str, Any] | None) -> None:
    from .engine.replicas import adopt_rank0

    cfg = run.cfg
    phase_epochs = cfg.method_epochs - run.method.epochs_in_prepare  # a stack spent some in prepare
    if phase_epochs > 0:
        run.work = _train(run.work, run.loaders["train"], cfg, phase_epochs, cfg.method_lr or cfg.lr, run.method,
                          run.out / "method_ckpt" if run.out else None, run.distiller)
    # DDP kept the parameters equal; BatchNorm statistics follow each rank's own last batches: finalize rank 0's
    run.work, _ = adopt_rank0(run.work)


def _finalize(run: _Run, info: dict[str, Any] | None) -> None:
    cfg, method, metric, test = run.cfg, run.method, run.metric, run.loaders["test"]
    key = method.finalize_key
    before_logits = before = after_logits = after = None
    if method.trains_before_finalize and cfg.stage_evals:
        before, before_logits, _ = _score(run.work, test, cfg, f"eval before {key}")
    run.compact = method.finalize(run.work).to(cfg.device)
    if cfg.stage_evals:
        after, after_logits, _ = _score(run.compact, test, cfg, f"eval after {key}")
    record = {f"{metric}_before": before, f"{metric}_after": after,
              "max_logit_change": (after_logits - before_logits).abs().max().item()
              if before_logits is not None and after_logits is not None else None}
    if before is not None and after is not None:
        record["gap"] = round(after - before, 2)
    warning = (method.report().get(key) or {}).get("warning") if method.trains_before_finalize else None
    if warning:
        tqdm.write(f"warning: {warning}")
    run.records["finalize"] = record
    run.records["score_after_finalize"] = after


def _recalibrate(run: _Run, info: dict[str, Any] | None) -> None:
    from .engine.recalibrate import recalibrate_bn
    from .engine.replicas import adopt_rank0

    cfg, record = run.cfg, run.records["finalize"]
    record["bn_recalib_batches"] = recalibrate_bn(run.compact, run.loaders["train"], cfg.bn_recalib, cfg.device)
    if record["bn_recalib_batches"] and cfg.stage_evals:
        score, _, _ = _score(run.compact, run.loaders["test"], cfg, "eval after BN recalibration")
        record[f"{run.metric}_recalibrated"] = run.records["score_after_finalize"] = score
    # a finalize that read data or drew at random may have kept other channels on another rank, and each rank
    # recalibrated on its own shard: every rank fine-tunes (and ends with) rank 0's model
    run.compact, run.records["structure_from_rank0"] = adopt_rank0(run.compact)


def _fine_tune(run: _Run, info: dict[str, Any] | None) -> None:
    from .engine.replicas import adopt_rank0

    cfg = run.cfg
    if cfg.ema is not None and cfg.epochs == 0:
        tqdm.write(f"warning: --ema {cfg.ema} has no fine-tune to average (0 fine-tune epochs); not applied")
    if cfg.epochs > 0:
        run.compact = _train(run.compact, run.loaders["train"], cfg, cfg.epochs, cfg.lr, None,
                             run.out / "finetune_ckpt" if run.out else None, run.distiller, cfg.ema)
        run.compact, _ = adopt_rank0(run.compact)  # the BatchNorm statistics of rank 0's last batches
    run.distiller = None


def _measure_compressed(run: _Run, info: dict[str, Any] | None) -> None:
    from .engine import distributed
    from .engine.replicas import state_digests

    cfg, after = run.cfg, run.records["score_after_finalize"]
    if cfg.epochs > 0 or after is None:  # stage_evals=False scored nothing yet: score the result once here
        after, _, _ = _score(run.compact, run.loaders["test"], cfg, "eval compressed")
    run.records["compressed"] = {"profile": profile(run.compact, run.input_shape), "score": after}
    if run.loaders["val"] is not None:  # the validation split beside test, for the base and the result
        run.records["base"]["val"] = _score(run.model, run.loaders["val"], cfg, "val base")[0]
        run.records["compressed"]["val"] = _score(run.compact, run.loaders["val"], cfg, "val compressed")[0]
    world = distributed.world_size()
    if world > 1:  # each rank checks for itself that every rank holds the same model
        digests = state_digests(run.compact)
        run.records["ddp"] = {"world_size": world, "ranks_identical": len(set(digests)) == 1,
                              "structure_from_rank0": run.records["structure_from_rank0"], "digests": digests}
        if not run.records["ddp"]["ranks_identical"]:
            tqdm.write(f"warning: the ranks ended with different models: {digests}")


def _time_latency(run: _Run, info: dict[str, Any] | None) -> None:
    """Base and compressed timed interleaved on the run's backend, at each --latency-batch within a time budget."""
    from .engine import distributed

    cfg = run.cfg
    if not cfg.latency or not distributed.is_main():
        return
    pair = {"base": copy.deepcopy(run.model).to(cfg.device).eval(),
            "compressed": copy.deepcopy(run.compact).to(cfg.device).eval()}
    base, comp, batches, repeats = [], [], [], []
    for b in progress_bar(cfg.latency_batches, desc="latency"):
        if cfg.latency_backend == "onnxruntime":  # the runtime the user deploys on, interleaved as on eager
            t, timed_b, reps = runtime_latency(pair, run.input_shape, b, cfg.latency_backend, cfg.latency_budget_s)
        else:
            t, timed_b, reps = budgeted_latency(pair, run.input_shape, batch=b, budget_s=cfg.latency_budget_s,
                                                max_repeats=cfg.latency_repeats)
        base.append(round(t["base"], 3))
        comp.append(round(t["compressed"], 3))
        batches.append(timed_b)
        repeats.append(reps)
    latency = {"batch": batches, "base": base, "compressed": comp,
               "ratio": [round(c / b, 4) for b, c in zip(base, comp)], "device": cfg.device,
               "backend": cfg.latency_backend, "repeats": repeats, "budget_s": cfg.latency_budget_s}
    if batches != list(cfg.latency_batches):
        latency["requested_batch"] = list(cfg.latency_batches)
        tqdm.write(f"latency: timed batch {batches} instead of {list(cfg.latency_batches)} to stay within "
                   f"{cfg.latency_budget_s:g} s per batch size")
    slower = slower_than_base(latency)
    if slower:
        latency["slower_than_base"] = slower
        tqdm.write(f"warning: {slower}")
    run.records["latency_ms"] = latency


def _confirm_latency_goal(run: _Run, info: dict[str, Any] | None) -> None:
    """--target-latency, planned by the method or turned into a MACs target before it (``info``): the compressed
    net timed against the base where the goal aimed."""
    from .engine import distributed

    run.records["method_report"] = run.method.report()
    lt = run.records["method_report"].get("latency_target") or (info or {}).get("latency_target")
    if isinstance(lt, dict) and distributed.is_main():
        from .graph.latency import confirm_latency

        lt.update(confirm_latency(run.model, run.compact, run.input_shape, lt["backend"], lt["batch"], lt["threads"],
                                  run.cfg.latency_budget_s))


def _build_report(run: _Run, model_name: str, info: dict[str, Any] | None, plan: RunPlan) -> dict[str, Any]:
    """report.json from the phases' records."""
    cfg, method, metric, rec = run.cfg, run.method, run.metric, run.records
    base, comp = rec["base"], rec["compressed"]
    bp, cp = base["profile"], comp["profile"]
    key = method.finalize_key
    method_report = rec["method_report"]
    fin_extra = method_report.pop(key, {}) if isinstance(method_report.get(key), dict) else {}
    val = lambda r: {f"val_{metric}": r["val"]} if "val" in r else {}  # noqa: E731
    report: dict[str, Any] = {
        "method": method.name, "model": model_name, "target_macs": cfg.target_macs, "task": cfg.task,
        "metric": metric,
        "base": {"macs": bp.macs, "params": bp.params, metric: base["score"], **val(base)},
        "compressed": {"macs": cp.macs, "params": cp.params, metric: comp["score"], **val(comp)},
        "macs_ratio": cp.macs / bp.macs, "speedup": bp.macs / cp.macs,
        "within_tol": within_tol(cp.macs, bp.macs, cfg.target_macs), "params_ratio": cp.params / bp.params,
        f"{metric}_change": round(comp["score"] - base["score"], 2), "latency_ms": rec.get("latency_ms"),
        "layer_control": (_layer_control_record(plan.policy, run.model, run.compact, run.input_shape) if plan.policy
                          else None),
        "finalize_key": key, key: {**fin_extra, **rec["finalize"]},
        "epoch_budget": epoch_budget(method, cfg), "phases": list(plan.phases), "recipe": cfg.recipe, "distill": _distill_record(cfg),
        "ema": {"decay": cfg.ema, "applied": cfg.epochs > 0} if cfg.ema is not None else None,
        "test_images": base["test_images"], "ddp": rec.get("ddp"), "config": asdict(cfg),
        "environment": environment(), **(info or {}),
    }
    _note_skipped_images(report, run.loaders)
    # the method's own figures (TRP's layers, Dagger's gates, ...) sit at the top level of the report
    report.update({k: v for k, v in method_report.items() if k not in report})
    if report["within_tol"] is False:
        tqdm.write(f"warning: MACs ratio {report['macs_ratio']:.4f} is more than 1% off the target {cfg.target_macs}")
    # aligned widths: counted at the run's --round-to, else at 8, so rows with and without it compare
    round_to = cfg.round_to or method.round_to
    report["alignment"] = {"round_to": round_to, **alignment(run.compact, round_to or 8),
                           "base_aligned_layers": alignment(run.model, round_to or 8)["aligned_layers"]}
    report["wall_s"] = round(time.time() - run.t0, 1)
    return report


def _distill_record(cfg: CompressConfig) -> dict[str, Any] | None:
    if not cfg.distill:
        return None
    return {"teacher": "the uncompressed base (eval mode, no gradient)", "alpha": cfg.kd_alpha,
            "temperature": cfg.kd_temperature,
            "phases": [ph for ph, n in (("method", cfg.method_epochs), ("finetune", cfg.epochs)) if n]}


def _note_skipped_images(report: dict[str, Any], loaders: dict[str, Any]) -> None:
    skipped = sorted(set(getattr(loaders["train"], "skipped", [])) | set(getattr(loaders["test"], "skipped", [])))
    if skipped:  # an image folder read with --skip-bad-images
        report["skipped_images"], report["skipped_examples"] = len(skipped), skipped[:10]
        tqdm.write(f"warning: skipped {len(skipped)} image(s) that could not be decoded, e.g. {skipped[0]}")
