"""What does a DANN training step cost here, against pytorch-adapt's DANN, and what does each method cost?

Two measurements, in one process, on the CPU (``--device cuda`` on a GPU), with
``--threads`` torch threads (1 by default: with other jobs on the machine, several OpenMP
threads per process make step times swing by 2-10x; ``--threads 0`` keeps torch's default):

1. This project's DANN step against pytorch-adapt 0.0.83's DANN (``pytorch_adapt.adapters.DANN``,
   which wraps ``pytorch_adapt.hooks.DANNHook``) on the same modules, batch and optimizer settings.
   Target: our step time / pytorch-adapt's step time <= 1.0.
2. Steps/s of every adaptation method of ``adapt.methods`` (the registry's ``METHODS``, plus
   any of adda, dsn, rtn, cycada that the registry knows when the benchmark runs: ADDA's
   stage 2 through ``build_adda``, CyCADA's pixel stage through ``CycadaPixel`` (its feature
   stage is ADDA's step), the others through ``build_method``; a method whose
   build or first step fails is skipped, with the reason) and of pytorch-adapt's DANN,
   relative to ``source_only``, on the same batches. No target.

The model (every method, both sides of the comparison): ``build_encoder("multilenet",
in_channels=C, dropout=0.0)`` (50-d features, no batch-norm), a ``ClassificationHead(50, 10,
hidden=--label-hidden)`` label head and, for DANN, ``DomainClassifier(50, hidden=100)``
(gradient reversal, Linear-ReLU-Linear to one logit), built as ``scripts/adapt_digits.py``
builds them (``build_parts``: the encoder from the seed, ``build_method(name, label_task,
num_classes=10, encoder=encoder, image_shape=(C, 28, 28))`` where it takes those, then
``build_model(name, encoder, 10, hidden=--label-hidden)``), so every copy starts from the
same weights. The data: ``--batches`` fixed batches (cycled) of
``--batch-size`` source images with labels and as many target images, 28x28; by default
the first images of the embedded ``mnist`` (source) and ``mnist_m_style`` (target) training
domains with ``--channels`` 3, as ``adapt_digits.py --source mnist --target mnist_m_style``
reads them (``--data random``: uniform random images and labels). Everything is built
before timing: no data loading is timed.

Our step (``Trainer._apply_schedule`` + ``Trainer.train_step`` without the Accelerator; the
weighting is not bound, so its backward is ``loss.backward()``): ``objective.set_progress(p)``
and ``objective.lr_factor(p)`` applied to every parameter group (p = min(step / 999, 1),
the Trainer's step / (total - 1) in a 1,000-step run: DANN's lambda_p and its annealed
learning rate, JMLR 2016 section 5.2.2, with the script's defaults);
``objective.losses(model, batch)`` on the paired batch ``{"source": (x_s, y_s), "target":
x_t}``; the losses stacked and copied to Python floats with a
finiteness check; ``StaticWeighting.backward`` (the registry's ``PAPER_LOSS_WEIGHTS``
where it has them, else 1 on every loss, the script's default ``--align-weight``; 1 and 1
for DANN); ``Adam.step`` (lr 1e-3, weight decay 0; over
``model.parameter_groups()`` plus the objective's parameters unless it owns an optimizer,
as the Trainer builds it); ``zero_grad(set_to_none=True)``. An objective with
``custom_step`` runs its own ``train_step`` against a small stand-in for the Trainer
(``StepHost``: an ``accelerate.Accelerator``, the optimizer, the model, the weighting, a
default ``TrainerConfig``, a ``Progress`` and an empty history; ``all_mean_grads`` does
nothing in one process).

pytorch-adapt's step: ``adapter.training_step(batch)`` with ``batch = {"src_imgs", "src_labels",
"target_imgs", "src_domain" (zeros), "target_domain" (ones)}`` and ``Models(G=encoder copy,
C=label-head copy, D=domain MLP copy without our reversal layer)``, ``Optimizers((Adam, lr
1e-3, weight decay 0))``: its hook chain computes G on the source and on the target images,
C on the source features, gradient reversal (weight 1) and D on both domains' features,
cross-entropy and per-domain BCE-with-logits (``reduction="none"``, then its MeanReducer),
sums the three losses (``SumWeighter``, see below; its weighter calls ``.item()`` on every
loss), ``zero_grad`` of the three optimizers, one ``backward``, ``step`` of the three Adams.

Where the two sides differ (what the md also says):

- Loss reduction: pytorch-adapt's default weighter (``MeanWeighter``) takes the mean of
  the three losses (c_loss, src_domain_loss, target_domain_loss), a third of our objective
  ``classification + (mean_s BCE(d, 0) + mean_t BCE(d, 1))`` (JMLR 2016 eq. 9); the
  benchmark gives it ``SumWeighter`` (``--peer-weighter sum``, the default) so both sides
  minimise the same function. The cost is the same either way (one division).
- Lambda: pytorch-adapt's reversal weight is a constant (``gradient_reversal_weight=1``);
  ours follows lambda_p = 2 / (1 + exp(-10 p)) - 1 and anneals the learning rate (a few
  scalar operations per step, which our side pays).
- Encoder passes: we encode ``cat(x_s, x_t)`` in one pass and run the domain head once on
  all 2B features; pytorch-adapt calls G twice and D twice (once per domain).
- Optimizers: one Adam over all parameters here; three Adams (G, C, D) in pytorch-adapt,
  with the same settings, so the same per-parameter update.

That both compute the same thing is checked before timing: ``--check-steps`` steps of each
side from the same weights, with our DANN's lambda fixed at 1 and no learning-rate
annealing (``DANN(schedule=False, anneal_lr=False)``), on the same batches; the JSON and md
give both sides' loss totals per step and the largest parameter difference afterwards.

pytorch-adapt is not a dependency of this project. It lives in ``--peer-dir``
(``benchmarks/.peer``, ignored by git), installed there with this environment's pip and
``--no-deps`` so that no second torch is installed (``python benchmarks/bench_adapt.py
--install-peer`` runs the command; the benchmark prints it when the folder is missing):

  python -m pip install --target benchmarks/.peer --no-deps pytorch-adapt==0.0.83 \\
      torchmetrics==0.9.3 pytorch-metric-learning==1.6.3 "setuptools<81"

(pytorch-adapt 0.0.83 pins torchmetrics 0.9.3, which imports ``pkg_resources``, gone from
setuptools 81 on; the other requirements, numpy, scikit-learn, tqdm, torch and torchvision,
come from this environment.) The folder is put on ``sys.path`` only inside this process.
Without it, our side is still measured and the comparison says SKIPPED with the reason.

How it is measured (wall clock, ``time.perf_counter``; on a GPU with a synchronize before
every clock read): every runner (each method, and pytorch-adapt's DANN) first runs two
warm-up steps; the second fixes how many consecutive steps it runs per round (enough for
about ``--round-seconds``, at most ``--max-steps``, at least 1). Then ``--rounds`` rounds:
each runs every runner once, for its block of steps, in an order rotated from round to
round, so that all see the same machine load. A runner's figure in a round is its mean step
time there; a ratio is the median of one runner's figures over the median of the other's
(per-round ratios, from the same round, are reported too). Steps/s = 1000 / median ms.
A run is flagged noisy when a runner's per-round figures, or a ratio's per-round values,
vary by more than 1.5x (max / min): only ratios measured in the same run are meaningful on
a noisy machine, and absolute times only on a GPU.

Results go to ``benchmarks/results/adapt.json`` and ``.md`` (atomic writes). The exit status
is 0 whether or not the target is met (1 only when ``--install-peer`` fails).

  python benchmarks/bench_adapt.py
  python benchmarks/bench_adapt.py --install-peer
  python benchmarks/bench_adapt.py --rounds 25 --threads 0 --methods source_only,dann
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import importlib
import inspect
import logging
import math
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adapt.data import build_domain  # noqa: E402
import adapt.methods as adapt_methods  # noqa: E402
from adapt.methods import METHODS, build_method, build_model  # noqa: E402
from common import (ensure_threads, install_into, load_average, machine_info, pip_target_command,  # noqa: E402
                    save_results, shown_path, sync)
from mtl.config import TrainerConfig  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.errors import ConfigError  # noqa: E402
from mtl.io import atomic_write  # noqa: E402
from mtl.optim import build_optimizer  # noqa: E402
from mtl.tasks import classification_task  # noqa: E402
from mtl.trainer import Progress  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402

#: methods other teams may add to the registry; timed when build_method knows them
EXTRA_METHODS = ("adda", "dsn", "rtn", "cycada")
BASELINE = "source_only"
PEER = "pytorch_adapt_dann"
NUM_CLASSES = 10
LR = 1e-3
NOMINAL_RUN_STEPS = 1000  # progress p = step / this (DANN's lambda_p and lr schedule)
TARGET = 1.0  # our DANN step / pytorch-adapt's DANN step
NOISY_SPREAD = 1.5
PEER_DIR = Path(__file__).resolve().parent / ".peer"
PEER_REQUIREMENTS = ("pytorch-adapt==0.0.83", "torchmetrics==0.9.3", "pytorch-metric-learning==1.6.3",
                     "setuptools<81")
CHECK_TOLERANCE = 1e-4  # largest parameter difference / largest parameter, after the check steps

OUR_STEP = (
    "objective.set_progress(p) and lr_factor(p) on every parameter group (p = min(step / 999, 1)), "
    "objective.losses(model, batch), losses stacked to floats with a finiteness check, StaticWeighting.backward "
    "(PAPER_LOSS_WEIGHTS or 1; unbound), Adam.step (lr 1e-3) over the Trainer's parameter groups, "
    "zero_grad(set_to_none=True); custom_step methods: their train_step; batches prebuilt"
)
#: what a row of the steps/s table means where it is not obvious
RUNNER_NOTES = {
    "target_only": "the source_only objective (the script pairs the labelled target split with itself; here the "
                   "same source batch)",
    "adda": "stage 2 (build_adda of an untrained source-only model): its train_step, one discriminator Adam step "
            "and one target-encoder step",
    "cycada": "its pixel stage (CycadaPixel of an untrained source-only f_S): one generator step (GAN, cycle and "
              "semantic losses through both generators and f_S) and one discriminator step; its feature stage is ADDA",
    PEER: "pytorch_adapt.adapters.DANN on copies of our DANN model's modules",
}
PEER_STEP = (
    "adapter.training_step(batch) of pytorch_adapt.adapters.DANN (DANNHook): G on source and on target images, C on "
    "source features, GradientReversal(1) + D per domain, CrossEntropyLoss and BCEWithLogitsLoss (reduction none, "
    "MeanReducer), SumWeighter (.item() per loss), zero_grad + backward + step of the G, C and D Adams (lr 1e-3)"
)
DIFFERENCES = [
    "Loss reduction: pytorch-adapt's default MeanWeighter averages its three losses (c_loss, src_domain_loss, "
    "target_domain_loss), a third of our objective classification + mean_s BCE(d, 0) + mean_t BCE(d, 1) (JMLR 2016 "
    "eq. 9); the benchmark gives it SumWeighter (--peer-weighter) so both minimise the same function; same cost.",
    "Lambda: pytorch-adapt's reversal weight is constant (1); ours follows lambda_p = 2 / (1 + exp(-10 p)) - 1 and "
    "anneals the learning rate (mu_0 / (1 + 10 p)^0.75, section 5.2.2), a few scalar operations that our side pays.",
    "Passes: we encode cat(x_s, x_t) once and run the domain head once on all features; pytorch-adapt calls G and D "
    "once per domain (two calls each on half the batch).",
    "Optimizers: one Adam over all parameters here; one Adam each for G, C and D in pytorch-adapt, same settings, "
    "so the same per-parameter update.",
]


# ----- arguments ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time this project's DANN training step against pytorch-adapt 0.0.83's DANN (same modules, "
                    "batch and optimizer; alternating rounds in one run; target ratio <= 1.0), and the steps/s "
                    "of every adaptation method relative to source_only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default="all",
                   help="comma-separated methods to time (source_only is always included), or 'all': the "
                        f"registry's METHODS plus any of {', '.join(EXTRA_METHODS)} it knows")
    p.add_argument("--rounds", type=int, default=15, help="alternating timed rounds")
    p.add_argument("--round-seconds", type=float, default=0.3,
                   help="aim for this much time per runner per round (sets the steps per round from the warm-up)")
    p.add_argument("--max-steps", type=int, default=50, help="most consecutive steps of one runner per round")
    p.add_argument("--batch-size", type=int, default=64, help="source images per batch (and as many target images)")
    p.add_argument("--batches", type=int, default=4, help="fixed prebuilt batches, cycled")
    p.add_argument("--data", choices=("digits", "random"), default="digits",
                   help="digits: the first images of the embedded mnist (source) and mnist_m_style (target) "
                        "training domains; random: uniform random images and labels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="image channels (3, as adapt_digits.py uses with mnist_m_style)")
    p.add_argument("--label-hidden", type=int, default=100,
                   help="hidden width of the label head (100, as scripts/adapt_digits.py builds it; 0: linear)")
    p.add_argument("--peer-weighter", choices=("sum", "mean"), default="sum",
                   help="pytorch-adapt's loss weighter: sum (the same objective as ours) or mean (its default, "
                        "a third of it)")
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of each DANN side from the same weights, compared before timing (0: skip)")
    p.add_argument("--peer-dir", type=Path, default=PEER_DIR,
                   help="folder holding pytorch-adapt and its pinned packages (pip install --target)")
    p.add_argument("--install-peer", action="store_true",
                   help="first install pytorch-adapt 0.0.83 into --peer-dir with this environment's pip "
                        "(--no-deps: this environment's torch is used), then run the benchmark")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: leave torch's default; the count used is recorded). 1 by "
                        "default: with other jobs on the machine, several OpenMP threads per process make step "
                        "times swing by 2-10x; use --threads 0 (or N) on a quiet machine")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models and batches live")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the model initialisation")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for adapt.json and adapt.md")
    args = p.parse_args(argv)
    if args.label_hidden < 0:
        p.error(f"--label-hidden must be >= 0 (0: a linear label head), got {args.label_hidden}")
    for name in ("rounds", "max_steps", "batch_size", "batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.check_steps < 0 or args.threads < 0:
        p.error(f"--check-steps and --threads must be >= 0, got {args.check_steps} and {args.threads}")
    if not args.round_seconds > 0:
        p.error(f"--round-seconds must be > 0, got {args.round_seconds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is present (torch.cuda.is_available() is False); use --device cpu")
    known = list(METHODS) + [m for m in EXTRA_METHODS if m not in METHODS]
    if args.methods.strip() == "all":
        methods = known
    else:
        methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
        bad = [m for m in methods if m not in known]
        if bad or not methods:
            p.error(f"--methods: unknown or no entries {bad}; choose from {', '.join(known)}, or 'all'")
    args.methods = [BASELINE] + [m for m in methods if m != BASELINE]
    return args


# ----- the peer: pytorch-adapt in its own folder ---------------------------------------------------


def load_peer(peer_dir: Path) -> tuple[dict | None, str | None]:
    """pytorch-adapt's modules from ``peer_dir`` (put first on sys.path, in this process only), or a reason."""
    peer_dir = Path(peer_dir).resolve()
    if not (peer_dir / "pytorch_adapt").is_dir():
        flag = "" if peer_dir == PEER_DIR else f" --peer-dir {shlex.quote(str(peer_dir))}"
        return None, (f"pytorch-adapt is not installed in {peer_dir}; install it with "
                      f"`python benchmarks/bench_adapt.py --install-peer{flag}` or "
                      f"`{shlex.join(pip_target_command(peer_dir, PEER_REQUIREMENTS))}`")
    if str(peer_dir) not in sys.path:
        sys.path.insert(0, str(peer_dir))  # after our own imports: only the peer's packages come from here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics 0.9.3 warns that pkg_resources is deprecated
            mods = {name: importlib.import_module(name) for name in (
                "pytorch_adapt", "pytorch_adapt.adapters", "pytorch_adapt.containers", "pytorch_adapt.weighters",
                "torchmetrics", "pytorch_metric_learning")}
    except Exception as e:  # a broken or incompatible install: measure our side anyway
        return None, f"importing pytorch-adapt from {peer_dir} failed: {type(e).__name__}: {e}"
    return mods, None


def peer_versions(mods: dict) -> dict:
    return {n: getattr(mods[n], "__version__", None) for n in ("pytorch_adapt", "torchmetrics",
                                                              "pytorch_metric_learning")}


class PeerDomainHead(nn.Module):
    """Our domain classifier's MLP without its reversal layer: pytorch-adapt reverses the gradient in its hook."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z.flatten(1)).squeeze(1)


class PeerRunner:
    """pytorch-adapt's DANN adapter on copies of our DANN model's encoder, label head and domain MLP."""

    def __init__(self, mods: dict, model, batches: list[dict], weighter: str):
        pa_adapters, pa_containers, pa_weighters = (mods["pytorch_adapt.adapters"], mods["pytorch_adapt.containers"],
                                                    mods["pytorch_adapt.weighters"])
        self.G = copy.deepcopy(model.encoder)
        self.C = copy.deepcopy(model.heads["label"])
        self.D = PeerDomainHead(copy.deepcopy(model.heads["domain"].net))
        models = pa_containers.Models({"G": self.G, "C": self.C, "D": self.D})
        optimizers = pa_containers.Optimizers((torch.optim.Adam, {"lr": LR, "weight_decay": 0.0}))
        weigh = pa_weighters.SumWeighter() if weighter == "sum" else pa_weighters.MeanWeighter()
        self.adapter = pa_adapters.DANN(models=models, optimizers=optimizers,
                                        hook_kwargs={"weighter": weigh, "gradient_reversal_weight": 1})
        self.adapter.models.train()
        self.batches, self.count, self.last_total = batches, 0, None

    def step(self) -> None:
        losses = self.adapter.training_step(self.batches[self.count % len(self.batches)])
        self.count += 1
        self.last_total = losses["total_loss"]["total"]

    def parameters_like_ours(self) -> list[torch.Tensor]:
        """In the order of ``OurRunner.dann_parameters``: encoder, label head, domain MLP."""
        return [*self.G.parameters(), *self.C.parameters(), *self.D.net.parameters()]


def peer_batch(batch: dict) -> dict:
    """The same tensors under pytorch-adapt's names, with its domain labels (source 0, target 1)."""
    x_s, y_s = batch["source"]
    x_t = batch["target"]
    return {"src_imgs": x_s, "src_labels": y_s, "target_imgs": x_t,
            "src_domain": torch.zeros(len(x_s), device=x_s.device),
            "target_domain": torch.ones(len(x_t), device=x_t.device)}


# ----- our side --------------------------------------------------------------------------------------


def make_batches(args, device: torch.device) -> tuple[list[dict], str]:
    """``args.batches`` paired batches ``{"source": (x_s, y_s), "target": x_t}``, and their description."""
    B, n = args.batch_size, args.batch_size * args.batches
    if args.data == "digits":
        source = build_domain("mnist", "train", channels=args.channels)
        target = build_domain("mnist_m_style", "train", channels=args.channels)
        if n > min(len(source), len(target)):
            raise SystemExit(f"--batch-size x --batches = {n} images, but the embedded domains have "
                             f"{min(len(source), len(target))}; use fewer")
        xs = torch.stack([source[i][0] for i in range(n)])
        ys = torch.tensor([int(source[i][1]) for i in range(n)])
        xt = torch.stack([target[i][0] for i in range(n)])  # the target's labels are never used
        what = f"mnist -> mnist_m_style (embedded), first {n} training images of each"
    else:
        gen = torch.Generator().manual_seed(args.seed)
        xs, xt = torch.rand(n, args.channels, 28, 28, generator=gen), torch.rand(n, args.channels, 28, 28,
                                                                                 generator=gen)
        ys = torch.randint(NUM_CLASSES, (n,), generator=gen)
        what = "uniform random images and labels"
    batches = [{"source": (xs[i * B:(i + 1) * B].to(device), ys[i * B:(i + 1) * B].to(device)),
                "target": xt[i * B:(i + 1) * B].to(device)} for i in range(args.batches)]
    return batches, f"{args.batches} batches of {B} source + {B} target {args.channels}x28x28 images: {what}"


class StepHost:
    """What a ``custom_step`` objective's ``train_step(trainer, batch)`` reads from the Trainer, without one."""

    def __init__(self, runner: "OurRunner"):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=runner.device.type == "cpu")
        self.model, self.optimizer, self.weighting = runner.model, runner.optimizer, runner.weighting
        self.objective, self.shared_params = runner.objective, runner.shared_params
        self.config = TrainerConfig(lr=LR, progress=False, tensorboard=False)
        self.progress = Progress()
        self.history: dict = {"skipped_steps": 0}
        self.last_checkpoint = None

    def all_mean_grads(self, params) -> None:  # one process: nothing to average
        return None


def build_parts(method: str, args, **options) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """``(objective, model, loss weights)`` of ``method``, built as ``scripts/adapt_digits.py`` builds them.

    The encoder is built first from ``args.seed`` (every copy starts from the same weights);
    ``build_method`` gets the encoder, image shape and class count when its signature takes
    them (DSN copies the encoder); the weights are the registry's ``PAPER_LOSS_WEIGHTS`` where
    it has them, else 1 (the script's default ``--align-weight``). ADDA and CyCADA, which are
    not in ``build_method``, start from an untrained source-only model (the step's cost does
    not depend on the weights): ADDA's stage 2 from ``build_adda``, CyCADA's pixel stage as
    ``CycadaPixel``.
    """
    label_task = classification_task("label", NUM_CLASSES)
    torch.manual_seed(args.seed)
    encoder = build_encoder("multilenet", in_channels=args.channels, dropout=0.0)
    if method == "adda" and method not in METHODS:
        build_adda = getattr(adapt_methods, "build_adda", None)
        if build_adda is None:
            raise ConfigError("adda: adapt.methods has no build_adda")
        stage1 = build_model("source_only", encoder, NUM_CLASSES, hidden=args.label_hidden)
        model, objective = build_adda(stage1, **options)
        return objective, model, dict.fromkeys(objective.loss_names, 1.0)
    if method == "cycada" and method not in METHODS:
        stage1 = build_model("source_only", encoder, NUM_CLASSES, hidden=args.label_hidden)
        objective = adapt_methods.CycadaPixel(label_task, stage1, channels=args.channels, **options)
        return objective, stage1, dict.fromkeys(objective.loss_names, 1.0)
    accepted = inspect.signature(build_method).parameters
    extra = {"num_classes": NUM_CLASSES, "encoder": encoder, "image_shape": (args.channels, 28, 28)}
    extra = {k: v for k, v in extra.items() if k in accepted}
    objective = build_method(method, label_task, **extra, **options)
    model = build_model(method, encoder, NUM_CLASSES, hidden=args.label_hidden)
    weights = getattr(adapt_methods, "PAPER_LOSS_WEIGHTS", {}).get(method)
    return objective, model, dict(weights) if weights else dict.fromkeys(objective.loss_names, 1.0)


class OurRunner:
    """One adaptation method training its own copy of the model; ``step()`` is the Trainer's step."""

    def __init__(self, method: str, batches: list[dict], args, device: torch.device, **options):
        self.method, self.batches, self.device = method, batches, device
        objective, model, weights = build_parts(method, args, **options)
        self.objective, self.model, self.weights = objective.to(device), model.to(device), weights
        self.model.train()
        self.objective.train()
        self.weighting = build_weighting("static", list(objective.loss_names), weights=weights).to(device)
        groups = self.model.parameter_groups()  # as Trainer.__init__ builds its optimizer
        if not self.weighting.own_optimizer and list(self.weighting.parameters()):
            groups.append({"params": list(self.weighting.parameters()), "lr_scale": 1.0})
        if not self.objective.own_optimizer and list(self.objective.parameters()):
            groups.append({"params": list(self.objective.parameters()), "lr_scale": 1.0})
        self.optimizer = build_optimizer(groups, TrainerConfig(lr=LR, progress=False, tensorboard=False))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.shared_params = list(self.model.shared_parameters())
        self.host = StepHost(self) if self.objective.custom_step else None
        self.count, self.last_values = 0, {}

    def apply_schedule(self) -> None:
        """``Trainer._apply_schedule``: progress to the objective, its learning-rate factor to every group."""
        progress = min(self.count / max(NOMINAL_RUN_STEPS - 1, 1), 1.0)
        self.objective.set_progress(progress)
        factor = self.objective.lr_factor(progress)
        if factor is not None:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor

    def step(self) -> None:
        batch = self.batches[self.count % len(self.batches)]
        self.apply_schedule()
        self.count += 1
        if self.host is not None:
            result = self.objective.train_step(self.host, batch)
            self.last_values = result[0] if result else {}
            return
        losses, rep = self.objective.losses(self.model, batch)
        rep = rep if self.weighting.needs_rep else None
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise RuntimeError(f"{self.method} step {self.count}: non-finite loss {values}")
        self.weighting.backward(losses, shared_params=self.shared_params, rep=rep)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_values = values

    def dann_parameters(self) -> list[torch.Tensor]:
        return [*self.model.encoder.parameters(), *self.model.heads["label"].parameters(),
                *self.model.heads["domain"].net.parameters()]


def build_runners(args, batches, device) -> tuple[dict[str, OurRunner], dict[str, str]]:
    """A runner per method whose build and first step succeed; the others with the reason they were skipped."""
    runners, skipped = {}, {}
    for method in args.methods:
        try:
            runner = OurRunner(method, batches, args, device)
        except ConfigError as e:
            unknown = method not in METHODS and "unknown adaptation method" in str(e)
            skipped[method] = ("not in adapt.methods' registry (build_method does not know it)" if unknown
                               else f"build failed: ConfigError: {e}")
            print(f"  {method}: skipped ({skipped[method]})", flush=True)
            continue
        except Exception as e:
            skipped[method] = f"build failed: {type(e).__name__}: {e}"
            print(f"  {method}: skipped ({skipped[method]})", flush=True)
            continue
        runners[method] = runner
    if BASELINE not in runners:
        raise SystemExit(f"the baseline {BASELINE} could not be built: {skipped.get(BASELINE)}")
    return runners, skipped


# ----- the same-computation check --------------------------------------------------------------------


def same_computation_check(args, mods, batches, pbatches, device) -> dict:
    """``--check-steps`` steps of both DANN sides from the same weights (our lambda fixed at 1, no lr annealing)."""
    ours = OurRunner("dann", batches, args, device, schedule=False, anneal_lr=False)
    peer = PeerRunner(mods, ours.model, pbatches, args.peer_weighter)
    scale = 1.0 if args.peer_weighter == "sum" else 3.0  # the mean weighter's total is a third of our sum
    rows = []
    for _ in range(args.check_steps):
        ours.step()
        peer.step()
        rows.append({"ours_total": sum(ours.last_values.values()), "peer_total_times_scale": peer.last_total * scale})
    with torch.no_grad():
        a, b = ours.dann_parameters(), peer.parameters_like_ours()
        if [t.shape for t in a] != [t.shape for t in b]:
            raise RuntimeError("the parameter lists of the two sides do not correspond")
        diff = max((x - y).abs().max().item() for x, y in zip(a, b))
        size = max(x.abs().max().item() for x in a)
    loss_diff = max(abs(r["ours_total"] - r["peer_total_times_scale"]) for r in rows)
    same_losses = loss_diff <= CHECK_TOLERANCE * max(abs(r["ours_total"]) for r in rows)
    same_parameters = diff / size <= CHECK_TOLERANCE
    note = None
    if args.peer_weighter == "mean":  # Adam is scale-invariant only up to its eps: the parameters drift apart
        note = ("with the mean weighter pytorch-adapt's gradient is a third of ours; Adam's update is the same only "
                "where the gradient is large against its eps, so only the loss totals (x 3) are compared")
    same = same_losses and (same_parameters or args.peer_weighter == "mean")
    return {"steps": args.check_steps, "losses": rows, "max_param_abs_diff": diff,
            "max_param_abs": size, "relative_param_diff": diff / size, "max_loss_abs_diff": loss_diff,
            "tolerance": CHECK_TOLERANCE, "same_losses": bool(same_losses), "same_parameters": bool(same_parameters),
            "same": bool(same), "note": note}


# ----- timing --------------------------------------------------------------------------------------




def timed_block(runner, steps: int, threads: int, device: torch.device) -> float:
    """Mean wall time of ``steps`` consecutive training steps."""
    ensure_threads(threads)
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def warm_up(runners: dict, skipped: dict, args, threads: int, device) -> dict[str, dict]:
    """Two steps each; a runner whose step fails is dropped (with the reason); the second sets steps per round."""
    plan = {}
    for name in list(runners):
        try:
            warm = [timed_block(runners[name], 1, threads, device) for _ in range(2)]
        except Exception as e:
            skipped[name] = f"first step failed: {type(e).__name__}: {e}"
            print(f"  {name}: skipped ({skipped[name]})", flush=True)
            del runners[name]
            continue
        steps = max(1, min(args.max_steps, round(args.round_seconds / warm[1])))
        plan[name] = {"steps_per_round": steps, "warmup_ms": [1000 * w for w in warm]}
        print(f"  warm-up {name:<20} {', '.join(f'{1000 * w:.1f}' for w in warm)} ms/step; {steps} step(s) per round",
              flush=True)
    if BASELINE not in runners:
        raise SystemExit(f"the baseline {BASELINE} failed its first step: {skipped.get(BASELINE)}")
    return plan


def alternate(runners: dict, plan: dict, args, threads: int, device) -> dict[str, list[float]]:
    """``args.rounds`` rounds, each running every runner once for its block, in an order rotated per round."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_block(runners[name], plan[name]["steps_per_round"], threads, device))
        print(f"  round {r + 1}/{args.rounds} (ms/step): " + ", ".join(f"{n} {times[n][r] * 1000:.1f}" for n in names),
              flush=True)
    return times


def ratio_figures(mine: list[float], base: list[float]) -> dict:
    ratios = [a / b for a, b in zip(mine, base)]
    return {"ratio_of_medians": statistics.median(mine) / statistics.median(base), "round_ratios": ratios,
            "median_round_ratio": statistics.median(ratios), "ratio_spread_max_over_min": max(ratios) / min(ratios)}


def figures(times: dict[str, list[float]], plan: dict) -> dict[str, dict]:
    base = times[BASELINE]
    out = {}
    for name, mine in times.items():
        med = statistics.median(mine)
        vs = ratio_figures(mine, base)
        out[name] = {"steps_per_round": plan[name]["steps_per_round"], "warmup_ms": plan[name]["warmup_ms"],
                     "round_ms": [1000 * t for t in mine], "median_ms": 1000 * med, "min_ms": 1000 * min(mine),
                     "max_ms": 1000 * max(mine), "spread_max_over_min": max(mine) / min(mine),
                     "steps_per_s": 1.0 / med, "steps_per_s_vs_source_only": 1.0 / vs["ratio_of_medians"],
                     "time_vs_source_only": vs}
    return out


# ----- report --------------------------------------------------------------------------------------


def comparison(times: dict, peer_reason: str | None) -> dict:
    if peer_reason is not None or PEER not in times or "dann" not in times:
        reason = peer_reason or ("our dann was not timed" if "dann" not in times else "pytorch-adapt was not timed")
        return {"target": f"our DANN step / pytorch-adapt DANN step <= {TARGET:.1f}", "limit": TARGET,
                "verdict": "SKIPPED", "reason": reason}
    r = ratio_figures(times["dann"], times[PEER])
    return {"target": f"our DANN step / pytorch-adapt DANN step <= {TARGET:.1f}", "limit": TARGET,
            "value": r["ratio_of_medians"], **r,
            "verdict": "PASS" if r["ratio_of_medians"] <= TARGET else "ABOVE TARGET"}


def noisy_entries(figs: dict, target: dict) -> list[str]:
    bad = []
    for name, f in figs.items():
        if len(f["round_ms"]) > 1 and f["spread_max_over_min"] > NOISY_SPREAD:
            bad.append(f"{name} step times {f['spread_max_over_min']:.2f}x")
        r = f["time_vs_source_only"]["ratio_spread_max_over_min"]
        if name != BASELINE and len(f["round_ms"]) > 1 and r > NOISY_SPREAD:
            bad.append(f"{name}/source_only round ratios {r:.2f}x")
    if target.get("verdict") != "SKIPPED" and len(target["round_ratios"]) > 1 \
            and target["ratio_spread_max_over_min"] > NOISY_SPREAD:
        bad.append(f"dann/pytorch-adapt round ratios {target['ratio_spread_max_over_min']:.2f}x")
    return bad


def write_markdown(path: Path, result: dict) -> None:
    m, cfg, t = result["machine"], result["config"], result["target"]
    rows = [
        "# Domain adaptation: DANN step against pytorch-adapt, and every method's steps/s",
        "",
        f"{cfg['device'].upper()}, {m['torch_threads']} torch threads, {result['date']}, {m['platform']}, "
        f"{m['cpu_count']} CPUs, {m['memory_gib']} GiB, torch {m['torch']}"
        + (f", pytorch-adapt {result['peer']['versions']['pytorch_adapt']}" if result["peer"].get("versions") else "")
        + f". Data: {result['data']}. Model: {result['model']}. {cfg['rounds']} round(s) after two warm-up steps "
        "each, every runner once per round (rotated order) for its block of steps; ratio = median of one runner's "
        "per-round ms/step over the median of the other's.",
        "",
        f"Our step: {OUR_STEP}.",
        "",
        f"pytorch-adapt's step: {PEER_STEP}" + (" (MeanWeighter here: --peer-weighter mean)."
                                                if cfg["peer_weighter"] == "mean" else "."),
        "",
        "## Target",
        "",
        "| target | limit | measured | median of per-round ratios | per-round ratios | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    if t["verdict"] == "SKIPPED":
        rows.append(f"| {t['target']} | <= {t['limit']:.2f} | | | | **SKIPPED**: {t['reason']} |")
    else:
        rows.append(f"| {t['target']} | <= {t['limit']:.2f} | {t['value']:.3f} | {t['median_round_ratio']:.3f} | "
                    f"{', '.join(f'{r:.2f}' for r in t['round_ratios'])} | **{t['verdict']}** |")
    c = result.get("same_computation_check")
    if c:
        rows += ["", "## Same computation", "",
                 f"{c['steps']} steps of each side from the same weights on the same batches, our DANN with lambda "
                 f"fixed at 1 and no learning-rate annealing: loss totals (ours / pytorch-adapt's) "
                 + "; ".join(f"{r['ours_total']:.6f} / {r['peer_total_times_scale']:.6f}" for r in c["losses"])
                 + f"; largest parameter difference afterwards {c['max_param_abs_diff']:.2e} (largest parameter "
                 f"{c['max_param_abs']:.3f}, relative {c['relative_param_diff']:.1e}): "
                 f"**{'same' if c['same'] else 'DIFFERENT'}** (tolerance {c['tolerance']:.0e})."
                 + (f" Note: {c['note']}." if c.get("note") else "")]
    rows += ["", "## Steps per second relative to source_only", "",
             "| runner | steps/round | median ms/step | min | max | steps/s | steps/s vs source_only | "
             "per-round time ratios vs source_only |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, f in result["runners"].items():
        label = "pytorch-adapt DANN" if name == PEER else name
        rows.append(f"| {label} | {f['steps_per_round']} | {f['median_ms']:.1f} | {f['min_ms']:.1f} | "
                    f"{f['max_ms']:.1f} | {f['steps_per_s']:.1f} | {f['steps_per_s_vs_source_only']:.3f} | "
                    f"{', '.join(f'{r:.2f}' for r in f['time_vs_source_only']['round_ratios'])} |")
    for name, reason in result["skipped"].items():
        rows.append(f"| {'pytorch-adapt DANN' if name == PEER else name} | | | | | | | SKIPPED: {reason} |")
    notes = [f"- {name}: {text}." for name, text in RUNNER_NOTES.items() if name in result["runners"]]
    if notes:
        rows += [""] + notes
    rows += ["", "## Where the two DANN implementations differ", ""] + [f"- {d}" for d in DIFFERENCES]
    load = result["load_average_1_5_15min"]
    rows += ["", f"Load average (1, 5, 15 min): start {load['start']}, end {load['end']}."]
    if result["noisy"]:
        rows.append(f"**Noisy run** (spread above {NOISY_SPREAD}x: {'; '.join(result['noisy_reasons'])}); "
                    "treat the ratios with caution.")
    rows += ["", f"Total wall time {result['wall_s']:.0f} s.", "", f"Command: `{result['command']}`", ""]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


def print_summary(result: dict, out: Path) -> None:
    print()
    print(f"our step: {OUR_STEP}")
    print(f"{'runner':<20} {'steps':>5} {'median ms':>10} {'min':>8} {'max':>8} {'steps/s':>8} {'vs src':>7}")
    for name, f in result["runners"].items():
        print(f"{name:<20} {f['steps_per_round']:>5} {f['median_ms']:>10.1f} {f['min_ms']:>8.1f} {f['max_ms']:>8.1f} "
              f"{f['steps_per_s']:>8.1f} {f['steps_per_s_vs_source_only']:>7.3f}")
    for name, reason in result["skipped"].items():
        print(f"{name:<20} SKIPPED: {reason}")
    c = result.get("same_computation_check")
    if c:
        print(f"same computation check ({c['steps']} steps): largest parameter difference "
              f"{c['max_param_abs_diff']:.2e} "
              f"(relative {c['relative_param_diff']:.1e}): {'same' if c['same'] else 'DIFFERENT'}")
    load = result["load_average_1_5_15min"]
    print(f"load average (1, 5, 15 min): start {load['start']}, end {load['end']}")
    if result["noisy"]:
        print(f"NOISY: {'; '.join(result['noisy_reasons'])} (max / min within this run). The machine was busy; "
              "rerun when it is quiet, or with more --rounds.")
    print(f"results: {out / 'adapt.json'}, {out / 'adapt.md'} ({result['wall_s']:.0f}s)")
    t = result["target"]
    if t["verdict"] == "SKIPPED":
        print(f"SKIPPED: {t['target']}: {t['reason']}")
    else:
        print(f"{t['verdict']}: {t['target']} = {t['value']:.3f} (median of per-round ratios "
              f"{t['median_round_ratio']:.3f})")


# ----- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install_peer and not install_into(args.peer_dir, PEER_REQUIREMENTS, "pytorch-adapt"):
        print(f"installing pytorch-adapt into {args.peer_dir} failed (see pip's output above)", file=sys.stderr)
        return 1
    for name in ("mtl", "adapt"):
        logging.getLogger(name).setLevel(logging.WARNING)
    threads_default = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    load_start = load_average()
    start = time.perf_counter()
    print(f"torch threads: {threads} (default {threads_default}); load average {load_start}", flush=True)

    mods, peer_reason = load_peer(args.peer_dir)
    if peer_reason:
        print(f"pytorch-adapt: {peer_reason}\n  the DANN comparison is SKIPPED; our methods are still measured",
              flush=True)
    batches, data = make_batches(args, device)
    pbatches = [peer_batch(b) for b in batches]
    print(f"data: {data}", flush=True)

    check = None
    if mods and args.check_steps:
        check = same_computation_check(args, mods, batches, pbatches, device)
        print(f"same computation check: largest parameter difference after {args.check_steps} steps "
              f"{check['max_param_abs_diff']:.2e} (relative {check['relative_param_diff']:.1e}): "
              f"{'same' if check['same'] else 'DIFFERENT'}", flush=True)

    runners, skipped = build_runners(args, batches, device)
    if mods:
        if "dann" in runners:
            runners[PEER] = PeerRunner(mods, runners["dann"].model, pbatches, args.peer_weighter)
        else:  # our DANN failed to build: the peer still gets the same modules
            torch.manual_seed(args.seed)
            model = build_model("dann", build_encoder("multilenet", in_channels=args.channels, dropout=0.0),
                                NUM_CLASSES, hidden=args.label_hidden).to(device)
            runners[PEER] = PeerRunner(mods, model, pbatches, args.peer_weighter)
    plan = warm_up(runners, skipped, args, threads, device)
    times = alternate(runners, plan, args, threads, device)
    load_end = load_average()

    figs = figures(times, plan)
    target = comparison(times, peer_reason if PEER not in skipped else skipped[PEER])
    noisy = noisy_entries(figs, target)
    result = {
        "benchmark": "adapt",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/bench_adapt.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"methods": args.methods, "rounds": args.rounds, "round_seconds": args.round_seconds,
                   "max_steps": args.max_steps, "batch_size": args.batch_size, "batches": args.batches,
                   "data": args.data, "channels": args.channels, "peer_weighter": args.peer_weighter,
                   "check_steps": args.check_steps, "threads": args.threads, "device": args.device,
                   "seed": args.seed, "optimizer": f"Adam lr {LR}, weight decay 0", "through_trainer": False,
                   "weighting_bound_to_accelerator": False, "nominal_run_steps": NOMINAL_RUN_STEPS},
        "data": data,
        "model": (f"build_model(name, build_encoder('multilenet', in_channels={args.channels}, dropout=0.0), "
                  f"{NUM_CLASSES}, hidden={args.label_hidden}); DANN adds DomainClassifier(50, hidden=100)"),
        "timed": {"ours": OUR_STEP, "pytorch_adapt": PEER_STEP},
        "differences": DIFFERENCES,
        "peer": {"dir": shown_path(args.peer_dir), "install_command": shlex.join(pip_target_command(args.peer_dir, PEER_REQUIREMENTS)),
                 "versions": peer_versions(mods) if mods else None, "unavailable": peer_reason},
        "machine": machine_info(torch_threads_default=threads_default, torch_threads=threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": bool(noisy),
        "noisy_reasons": noisy,
        "same_computation_check": check,
        "target": target,
        "runners": figs,
        "skipped": skipped,
        "wall_s": time.perf_counter() - start,
    }
    out = save_results(args.out_dir, "adapt", result, write_markdown)
    print_summary(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
