"""How long does a whole Split-MNIST stream take here, against Avalanche, strategy by strategy?

One process, on the CPU, with ``--threads`` torch threads (1 by default: with other jobs on
the machine, several OpenMP threads per process make times swing). For each strategy of
``--strategies`` (finetune, ewc, er, lwf) the same continual run is done by this project
(``continual.runner.StreamRunner``) and by Avalanche (``avalanche-lib``, pinned below), on
the same stream, from the same weights, with the same optimisation settings, and the wall
time of the WHOLE stream run (build the model and strategy, train the five experiences,
evaluate after each) is taken. Target: our time / Avalanche's time <= 0.5 (median over
rounds). Beside the times, the final ACC (mean accuracy over the five experiences after the
last one) of both sides.

The stream: ``build_stream("split_mnist", setting)``, the embedded MNIST (4,000 training /
1,000 test images, 28x28 in [0, 1]) in five experiences of two classes, (0, 1), (2, 3), ...;
Class-IL by default (one growing head, no task id at test), ``--setting task`` for Task-IL
(a head per experience, task id given). Avalanche gets the same tensors through
``avalanche.benchmarks.nc_benchmark`` (what its own ``SplitMNIST`` calls), with the class
order fixed to ours and the labels it then uses equal to our head targets
(``class_ids_from_zero_from_first_exp`` in Class-IL, ``class_ids_from_zero_in_each_exp``
and task labels in Task-IL); the experiences are checked to hold the same classes and
sizes.

The model: ``build_encoder("mlp")`` (784-100-100, ReLU), seeded as
``scripts/continual_mnist.py`` seeds it, its state dict copied into every run of both
sides (Avalanche gets the encoder's ``nn.Sequential``), plus a linear classifier: Class-IL
our ``IncrementalClassifier`` and Avalanche's ``IncrementalClassifier`` (masked units),
both growing by the new classes of each experience; Task-IL our ``nn.Linear(100, 2)`` per
task (``head_factory``) and Avalanche's ``MultiHeadClassifier`` in a ``MultiTaskModule``
(the shape of its ``MTSimpleMLP``). Output units that appear later are drawn by each
library's own code from the global RNG, so both sides here take them from one seeded table
(a small subclass of each library's class that overwrites the new rows): every run of
either side starts every unit from the same weights.

Optimisation (``scripts/continual_mnist.py``'s defaults): ``--epochs`` 5 per experience, ``--batch-size`` 10,
SGD lr ``--lr`` 0.03 with momentum 0.9 (our TrainerConfig's SGD momentum; Avalanche gets
``torch.optim.SGD(lr, momentum=0.9)``), weight decay 0, momentum reset at each experience
(our runner builds one Trainer, hence one optimizer, per experience; Avalanche is given
``reset_optimizer_state=True``). Evaluation batches of 256 on both sides.

Strategies (ours through ``build_strategy``; Avalanche's class):

- finetune: ``FineTune`` / ``avalanche.training.Naive``.
- ewc: ``EWC(strength=lambda)`` / ``avalanche.training.EWC(ewc_lambda=lambda / 2,
  mode="separate")``. Both then minimise CE + lambda/2 sum_k sum_i F_k,i (theta_i -
  theta*_k,i)^2, one anchor per past experience (Avalanche's penalty has no 1/2, so it gets
  lambda / 2). Their Fisher differs: ours is the per-sample empirical Fisher (mean of
  squared per-sample gradients, ``torch.func.vmap``); Avalanche's is the mean over
  minibatches of the squared gradient of each minibatch's MEAN loss, which is much smaller
  (``continual/fisher.py`` explains why it is a different quantity), so the same lambda
  pulls less there.
- er: ``ER(buffer_size=M)`` / ``avalanche.training.Naive`` with
  ``ReplayPlugin(mem_size=M, storage_policy=ReservoirSamplingBuffer(M))``, the closest
  Avalanche buffer to ours (its default, ``ExperienceBalancedBuffer``, splits the memory
  evenly between experiences). Differences: ours offers every training sample to a
  per-sample reservoir as it is trained on and replays from the first batch on; Avalanche
  updates its memory at the end of each experience (a uniform random subset of everything
  seen, the same distribution at experience boundaries) and replays from the second
  experience on. Both concatenate a memory batch of the same size to the current batch
  and run one forward pass; ours adds the memory rows' mean cross-entropy to the current
  rows' (CE_cur + CE_mem), Avalanche takes one mean over both (a half of our sum).
- lwf: ``LwF(alpha, temperature)`` / ``avalanche.training.LwF(alpha, temperature)``: the
  model after the previous experience as teacher, softened outputs of the old classes (or
  old heads), weight alpha. Ours is the soft cross-entropy, Avalanche's the KL divergence,
  which differ by a constant (the teacher's entropy): the same gradient. Ours records the
  teacher's soft targets once per experience before training (the paper's Algorithm 1;
  the stream has no augmentation, so they equal a teacher pass per batch); Avalanche runs
  the teacher on every batch. In Task-IL Avalanche runs the current model a second time
  over all heads on each batch.

Evaluation (the same amount on both sides): after each experience, the accuracy on the
test split of every experience seen so far. Ours: ``StreamRunner`` evaluates every
experience of the stream, which for unseen experiences returns at once (no head or no
outputs for their classes yet); its Class-IL runs also measure a second, task-aware
accuracy matrix by default, which is turned off here (``runner.task_matrix = None``) since
Avalanche computes one. Avalanche: ``strategy.eval(test_stream[:i + 1])`` with an
``EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])`` in place of its default
evaluator (which also computes epoch/stream accuracies and losses and prints through an
``InteractiveLogger`` with progress bars); no periodic evaluation during training
(``eval_every=-1``).

Our side is the product as a user runs it, minus what costs time for a person watching:
``StreamRunner`` with progress bars and TensorBoard off (``TrainerConfig(progress=False,
tensorboard=False)``), in a fresh temporary run folder per run (deleted after the clock
stops). It builds an ``accelerate.Accelerator`` and a Trainer per experience (which writes
its ``config.json`` and ``history.json``), and after each experience the whole-run
checkpoint ``checkpoints/stream.pt`` (model, strategy state, accuracy matrix, RNG states)
and ``accuracy_matrix.json``, every file written atomically and flushed to disk: that is
what makes a killed run resumable, and it is part of the time measured. Avalanche writes nothing. The
runner's one line per experience goes to an in-memory buffer.

How it is measured (wall clock, ``time.perf_counter``): each (strategy, side) pair first
runs ``--warmup`` untimed stream(s) with one epoch per experience (first-call costs:
imports, torch.func set-up). Then
``--rounds`` rounds; in each, every strategy runs ours then Avalanche's (Avalanche first in
odd rounds), one whole stream each. A figure is the median over rounds; the ratio is our
median over Avalanche's (per-round ratios are reported too). The global RNGs are seeded
(``--seed``) before every run, so every round of a side trains the same way and gives the
same ACC (both are listed). A run is flagged noisy when a pair's per-round times, or a
ratio's per-round values, vary by more than 1.5x (max / min).

Avalanche is not a dependency of this project. It lives in ``--peer-dir``
(``benchmarks/.peer/avalanche-lib``, inside the folder git already ignores), installed
there with this environment's pip and ``--no-deps``, so that neither torch nor anything
else in ``.venv`` is replaced (``--install-peer`` runs the command; it is printed when the
folder is missing):

  python -m pip install --target benchmarks/.peer/avalanche-lib --no-deps avalanche-lib==0.6.0 \\
      dill==0.4.1 gdown==6.5.1 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.18 \\
      beautifulsoup4==4.15.0 gputil==1.4.0 pytorchcv==0.0.74 torchmetrics==1.9.0 \\
      lightning-utilities==0.15.3 qpsolvers==4.13.0 wandb==0.31.0 platformdirs==4.14.7 \\
      pydantic==2.14.3 pydantic-core==2.50.4 typing-inspection==0.4.5 annotated-types==0.8.0 \\
      opentelemetry-api==1.45.2 xxhash==4.1.0

(avalanche-lib 0.6.0 requires torch without a pin; these are the packages that
``import avalanche.training`` needs beyond this environment: wandb is imported at module
level by its confusion-matrix metric, gdown by its CUB-200 loader, the rest by those two
and by avalanche itself.) The folder is appended to ``sys.path`` in this process only, so
every package this environment has (torch, numpy, ...) still comes from it. Without the
folder, our side is still measured and the comparison says SKIPPED with the reason.

Results go to ``benchmarks/results/avalanche.json`` and ``.md`` (atomic writes). The exit
status is 0 whether or not the target is met (1 only when ``--install-peer`` fails).

  python benchmarks/bench_vs_avalanche.py
  python benchmarks/bench_vs_avalanche.py --install-peer
  python benchmarks/bench_vs_avalanche.py --setting task --rounds 3 --strategies finetune,er
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib
import importlib.metadata
import io
import logging
import math
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from common import (ensure_threads, install_into, load_average, machine_info, parse_choices,  # noqa: E402
                    pip_target_command, save_results, shown_path)
from continual.learner import ContinualLearner, IncrementalClassifier  # noqa: E402
from continual.runner import StreamRunner  # noqa: E402
from continual.scenarios import build_stream  # noqa: E402
from continual.strategies import build_strategy, strategy_options  # noqa: E402
from mtl.config import TrainerConfig  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.io import atomic_write  # noqa: E402

STRATEGIES = ("finetune", "ewc", "er", "lwf")
SETTINGS = ("class", "task")
TARGET = 0.5  # our stream time / Avalanche's stream time
NOISY_SPREAD = 1.5
WARMUP_EPOCHS = 1  # warm-up streams pay the first-call costs; one epoch per experience is enough for that
EVAL_BATCH = 256  # ContinualLearner.accuracy's batch size; Avalanche's eval_mb_size
MOMENTUM = TrainerConfig().momentum  # what our SGD uses (0.9)
PEER_DIR = Path(__file__).resolve().parent / ".peer" / "avalanche-lib"
AVALANCHE_VERSION = "0.6.0"
PEER_REQUIREMENTS = (
    f"avalanche-lib=={AVALANCHE_VERSION}", "dill==0.4.1", "gdown==6.5.1", "requests==2.34.2", "urllib3==2.8.0",
    "certifi==2026.10.18", "beautifulsoup4==4.15.0", "gputil==1.4.0", "pytorchcv==0.0.74", "torchmetrics==1.9.0",
    "lightning-utilities==0.15.3", "qpsolvers==4.13.0", "wandb==0.31.0", "platformdirs==4.14.7",
    "pydantic==2.14.3", "pydantic-core==2.50.4", "typing-inspection==0.4.5", "annotated-types==0.8.0",
    "opentelemetry-api==1.45.2", "xxhash==4.1.0",
)
SIDES = ("ours", "avalanche")

AVALANCHE_CLASSES = {
    "finetune": "avalanche.training.Naive",
    "ewc": "avalanche.training.EWC(ewc_lambda=lambda / 2, mode='separate')",
    "er": "avalanche.training.Naive + ReplayPlugin(mem_size=M, storage_policy=ReservoirSamplingBuffer(M))",
    "lwf": "avalanche.training.LwF(alpha, temperature)",
}
OUR_RUN = (
    "StreamRunner(ContinualLearner, build_strategy(name), TrainerConfig(optimizer='sgd', progress=False, "
    "tensorboard=False, cpu=True)).run() in a fresh temporary run folder: per experience an Accelerator and a "
    "Trainer (its config.json and history.json), then checkpoints/stream.pt (model, strategy state, "
    "accuracy matrix, RNG states) and accuracy_matrix.json; evaluation of every seen experience after each "
    "experience (the Class-IL task-aware second matrix turned off)"
)
AVALANCHE_RUN = (
    "for each experience: strategy.train(exp, eval_streams=[], reset_optimizer_state=True), then "
    "strategy.eval(test_stream[:i + 1]) with EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]) "
    "instead of the default evaluator (no printing or progress bars), eval_every=-1; nothing written to disk"
)
DIFFERENCES = [
    "Checkpoints: our runner writes the whole-run checkpoint (model, strategy state, accuracy matrix, RNGs) and the "
    "experience's Trainer history after each experience, atomically and flushed to disk, so a killed run "
    "resumes exactly; Avalanche writes nothing (its CheckpointPlugin is not used). Our time includes this.",
    "Per experience our runner builds an accelerate.Accelerator and a Trainer (one code path for CPU, GPU and "
    "multi-GPU); Avalanche reuses one strategy object.",
    "Evaluation: both measure the accuracy on every seen experience after each experience (our Class-IL runner's "
    "second, task-aware matrix is turned off); Avalanche's default evaluator, which also tracks epoch and stream "
    "metrics and prints, is replaced by experience accuracy only with no logger.",
    "EWC: the same objective CE + lambda/2 sum F (theta - theta*)^2 with one anchor per experience (Avalanche's "
    "ewc_lambda = lambda / 2, as its penalty has no 1/2), but a different Fisher: ours per sample (vmap), "
    "Avalanche's the squared gradient of each minibatch's mean loss, averaged over minibatches (much smaller: the "
    "same lambda regularises less).",
    "ER: ours is a per-sample reservoir updated at every step (current samples included) and replays from the "
    "first batch; Avalanche's ReservoirSamplingBuffer is updated at the end of each experience and replays from the "
    "second. Both train on the current batch concatenated with a memory batch of the same size as one batch: one "
    "forward pass, one mean CE over both (Chaudhry et al. 2019, Algorithm 1).",
    "LwF: the soft cross-entropy (ours) and the KL divergence (Avalanche's) to the previous model's softened "
    "outputs on the old classes differ by a constant: the same gradient, the same alpha and temperature. Ours "
    "records those outputs once per experience before training (LwF's Algorithm 1), Avalanche runs the old model "
    "on every batch. In Task-IL Avalanche forwards the current model a second time over all heads on each batch.",
    "Heads: both grow a linear classifier (Class-IL: masked units in Avalanche, sliced outputs here) or add one per "
    "task (Task-IL); new units take their weights from one seeded table on both sides (instead of each library's "
    "draw from the global RNG), so that both start every unit from the same weights.",
    "Data: the same tensors and experiences; ours are gathered a batch at a time from float tensors, Avalanche wraps "
    "them in its "
    "AvalancheDataset (nc_benchmark, as its SplitMNIST does). Shuffling differs (ours: a seeded epoch sampler; "
    "Avalanche: the global RNG, seeded before each run).",
]


# ----- arguments and the peer --------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time whole Split-MNIST stream runs of this project's continual strategies against Avalanche's "
                    f"(avalanche-lib {AVALANCHE_VERSION}): same stream, model, initial weights, optimizer and "
                    "strategy settings; alternating rounds in one run; target ratio <= 0.5; final ACC of both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--setting", choices=SETTINGS, default="class",
                   help="class: one growing head, no task id (Class-IL); task: a head per experience (Task-IL)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each: every strategy, both sides, once)")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed stream runs ({WARMUP_EPOCHS} epoch per experience) of each (strategy, side) first")
    p.add_argument("--epochs", type=int, default=5, help="epochs per experience (the script's default)")
    p.add_argument("--batch-size", type=int, default=10, help="training batch (the script's default)")
    p.add_argument("--lr", type=float, default=0.03, help=f"SGD learning rate (momentum {MOMENTUM}; the script's "
                                                          "default)")
    p.add_argument("--strength", type=float, default=None,
                   help="EWC's lambda (default: our EWC's default); Avalanche gets ewc_lambda = lambda / 2")
    p.add_argument("--buffer-size", type=int, default=None, help="ER's memory in samples (default: our ER's default)")
    p.add_argument("--alpha", type=float, default=None, help="LwF's weight (default: our LwF's default)")
    p.add_argument("--temperature", type=float, default=None, help="LwF's temperature (default: our LwF's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the runs and the memories")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: leave torch's default). 1 by default: other jobs share the machine")
    p.add_argument("--peer-dir", type=Path, default=PEER_DIR,
                   help="folder holding avalanche-lib and its pinned packages (pip install --target)")
    p.add_argument("--install-peer", action="store_true",
                   help=f"first install avalanche-lib {AVALANCHE_VERSION} and the packages it imports into --peer-dir "
                        "with this environment's pip (--no-deps: this environment's torch is used), then run")
    p.add_argument("--tmp-dir", type=Path, default=None,
                   help="where our runs' temporary run folders go (default: the system's temporary folder)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for avalanche.json and avalanche.md")
    args = p.parse_args(argv)
    args.strategies = parse_choices(p, "--strategies", args.strategies, STRATEGIES)
    for name in ("rounds", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    return args


def load_peer(peer_dir: Path) -> tuple[dict | None, str | None]:
    """Avalanche's modules from ``peer_dir`` (appended to sys.path, in this process only), or a reason."""
    peer_dir = Path(peer_dir).resolve()
    if not (peer_dir / "avalanche").is_dir():
        flag = "" if peer_dir == PEER_DIR else f" --peer-dir {shlex.quote(str(peer_dir))}"
        return None, (f"avalanche-lib is not installed in {shown_path(peer_dir)}; install it with "
                      f"`python benchmarks/bench_vs_avalanche.py --install-peer{flag}` (the pip command it runs is "
                      "in the results' peer.install_command)")
    if str(peer_dir) not in sys.path:
        sys.path.append(str(peer_dir))  # last: whatever this environment has (torch, numpy, ...) wins
    # Avalanche warns about missing loggers, deprecated calls and the like on every run: not our business here.
    warnings.filterwarnings("ignore", module=r"avalanche(\.|$)")
    names = ("avalanche", "avalanche.training", "avalanche.training.plugins", "avalanche.training.storage_policy",
             "avalanche.benchmarks", "avalanche.models", "avalanche.evaluation.metrics")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mods = {name: importlib.import_module(name) for name in names}
    except Exception as e:  # a broken or incompatible install: measure our side anyway
        return None, f"importing avalanche from {shown_path(peer_dir)} failed: {type(e).__name__}: {e}"
    origin = Path(mods["avalanche"].__file__).resolve()
    if not origin.is_relative_to(peer_dir):
        return None, f"avalanche was imported from {origin}, not from {shown_path(peer_dir)}"
    return mods, None


def peer_versions(peer_dir: Path) -> dict[str, str]:
    """``{distribution: version}`` of what pip put into ``peer_dir``."""
    found = importlib.metadata.distributions(path=[str(Path(peer_dir).resolve())])
    return dict(sorted((d.metadata["Name"], d.version) for d in found))


# ----- the shared set-up -------------------------------------------------------------------------


class SplitImages(Dataset):
    """Images and integer labels with the ``targets`` list Avalanche's benchmark generators read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def head_table(rows: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases for ``rows`` output units, drawn as ``nn.Linear`` draws them (U(+-1/sqrt(fan_in)))."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    bound = 1.0 / math.sqrt(features)
    weight = (torch.rand(rows, features, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(rows, generator=gen) * 2 - 1) * bound
    return weight, bias


class Setup:
    """What every run of both sides starts from: the stream, the encoder's weights, the output-unit table."""

    def __init__(self, args):
        self.args = args
        self.stream = build_stream("split_mnist", args.setting, seed=args.seed)
        torch.manual_seed(args.seed)  # as scripts/continual_mnist.py seeds the encoder
        channels, size = self.stream.input_shape[0], self.stream.input_shape[-1]
        self.encoder_kwargs = {"in_channels": channels, "size": size}
        encoder = build_encoder("mlp", **self.encoder_kwargs)
        self.encoder_state = copy.deepcopy(encoder.state_dict())
        self.features = encoder.out_features
        self.width = max(len(e.classes) for e in self.stream)  # outputs of a Task-IL head
        rows = self.stream.num_classes if args.setting == "class" else self.width * len(self.stream)
        self.table = head_table(rows, self.features, args.seed)
        self.options = {name: self.strategy_options(name) for name in STRATEGIES}

    def strategy_options(self, name: str) -> dict:
        """Our strategy's options: the command line's where given, else the strategy's defaults."""
        a = self.args
        given = {"strength": a.strength, "buffer_size": a.buffer_size, "alpha": a.alpha, "temperature": a.temperature,
                 "seed": a.seed}
        defaults = strategy_options(name)
        return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items() if k in given}

    def encoder(self) -> nn.Module:
        encoder = build_encoder("mlp", **self.encoder_kwargs)
        encoder.load_state_dict(self.encoder_state)
        return encoder

    def describe(self) -> dict:
        s = self.stream
        return {
            "stream": f"{s.name}, {s.setting}-IL: {len(s)} experiences "
                      + ", ".join(str(e.classes) for e in s)
                      + f"; {sum(len(e.train) for e in s)} training / {sum(len(e.test) for e in s)} test images "
                      "(embedded MNIST, 28x28, [0, 1])",
            "train_sizes": [len(e.train) for e in s],
            "test_sizes": [len(e.test) for e in s],
            "model": (f"build_encoder('mlp', in_channels={self.encoder_kwargs['in_channels']}, size="
                      f"{self.encoder_kwargs['size']}) (784-100-100, ReLU; seed {self.args.seed}, its state dict "
                      "copied into every run) + "
                      + ("a growing linear classifier (ours: IncrementalClassifier; Avalanche: IncrementalClassifier, "
                         "masked units)" if s.setting == "class" else
                         f"a linear head 100 -> {self.width} per task (ours: head_factory; Avalanche: "
                         "MultiHeadClassifier in a MultiTaskModule)")
                      + "; new output units from one seeded table on both sides"),
        }


# ----- our side ----------------------------------------------------------------------------------


class TableIncrementalClassifier(IncrementalClassifier):
    """Our growing Class-IL head, whose new outputs take their weights from the shared table."""

    def __init__(self, in_features: int, table: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(in_features)
        self.table = table  # plain tensors: not parameters, not in the state dict

    def grow(self, num_classes: int) -> None:
        old = self.num_classes
        super().grow(num_classes)
        if self.num_classes > old:
            weight, bias = self.table
            with torch.no_grad():
                self.linear.weight[old:self.num_classes] = weight[old:self.num_classes]
                self.linear.bias[old:self.num_classes] = bias[old:self.num_classes]


def table_head_factory(setup: Setup):
    """Our Task-IL ``head_factory``: the k-th head built (task k: heads are added in stream order) gets the
    table's rows k * width ... (k + 1) * width."""
    built = [0]
    weight, bias = setup.table

    def factory(in_features: int, outputs: int) -> nn.Module:
        k = built[0]
        built[0] += 1
        head = nn.Linear(in_features, outputs)
        with torch.no_grad():
            head.weight.copy_(weight[k * outputs:(k + 1) * outputs])
            head.bias.copy_(bias[k * outputs:(k + 1) * outputs])
        return head

    return factory


def our_learner(setup: Setup) -> ContinualLearner:
    """The learner of one run: the seeded encoder's weights, heads whose units come from the table."""
    encoder = setup.encoder()
    if setup.stream.setting == "task":
        return ContinualLearner(encoder, setup.stream, head_factory=table_head_factory(setup))
    learner = ContinualLearner(encoder, setup.stream)
    learner.model.heads[setup.stream.head_name(0)] = TableIncrementalClassifier(encoder.out_features, setup.table)
    return learner


def our_run(setup: Setup, name: str, tmp_dir, epochs: int) -> tuple[float, list[list[float]]]:
    """One whole stream with our StreamRunner: (wall seconds, accuracy rows after each experience)."""
    args = setup.args
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-avalanche-{name}-", dir=tmp_dir))
    sink = io.StringIO()
    try:
        started = time.perf_counter()
        learner = our_learner(setup)
        strategy = build_strategy(name, **setup.options[name])
        config = TrainerConfig(epochs=epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
                               seed=args.seed, progress=False, tensorboard=False, cpu=True)
        runner = StreamRunner(learner, strategy, config, run_dir / "run",
                              run_config={"strategy": name, "setting": setup.stream.setting, **setup.options[name]})
        runner.task_matrix = None  # the Class-IL task-aware matrix: a second evaluation Avalanche does not do
        with contextlib.redirect_stdout(sink):
            runner.run()
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    values = runner.matrix.values
    rows = [[float(values[i, j]) for j in range(i + 1)] for i in range(len(setup.stream))]
    return seconds, rows


# ----- Avalanche's side --------------------------------------------------------------------------


class AvalancheSide:
    """Avalanche's benchmark (built once) and the classes of its models (they subclass Avalanche's)."""

    def __init__(self, mods: dict, setup: Setup):
        self.mods, self.setup = mods, setup
        stream, task = setup.stream, setup.stream.setting == "task"
        train = SplitImages(torch.cat([e.train.images for e in stream]), torch.cat([e.train.labels for e in stream]))
        test = SplitImages(torch.cat([e.test.images for e in stream]), torch.cat([e.test.labels for e in stream]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.benchmark = mods["avalanche.benchmarks"].nc_benchmark(
                train, test, n_experiences=len(stream), task_labels=task, shuffle=False,
                fixed_class_order=list(stream.class_order), class_ids_from_zero_in_each_exp=task,
                class_ids_from_zero_from_first_exp=not task)
        self.check_benchmark()
        self.classes = self.model_classes()

    def check_benchmark(self) -> None:
        """Avalanche's experiences hold our experiences' classes (as our head targets) and sizes."""
        stream = self.setup.stream
        for ours, train_exp, test_exp in zip(stream, self.benchmark.train_stream, self.benchmark.test_stream):
            expected = sorted(int(v) for v in stream.head_label(ours, torch.tensor(ours.classes)))
            got = sorted(int(c) for c in train_exp.classes_in_this_experience)
            sizes = (len(train_exp.dataset), len(test_exp.dataset))
            if got != expected or sizes != (len(ours.train), len(ours.test)):
                raise RuntimeError(f"Avalanche's experience {ours.index} holds classes {got} and {sizes} images; ours "
                                   f"{expected} and {(len(ours.train), len(ours.test))}")
            if stream.setting == "task" and list(train_exp.task_labels) != [ours.task_id]:
                raise RuntimeError(f"Avalanche's experience {ours.index} has task labels {train_exp.task_labels}")
        if len(self.benchmark.train_stream) != len(stream):
            raise RuntimeError(f"Avalanche built {len(self.benchmark.train_stream)} experiences, we {len(stream)}")

    def model_classes(self) -> dict:
        models = self.mods["avalanche.models"]
        weight, bias = self.setup.table

        class TableAvalancheIncremental(models.IncrementalClassifier):
            """Avalanche's IncrementalClassifier whose new units take the shared table's weights."""

            def __init__(self, in_features: int, initial: int):
                super().__init__(in_features, initial_out_features=initial)
                self.take_rows(0)

            @torch.no_grad()
            def take_rows(self, start: int) -> None:
                end = self.classifier.out_features
                self.classifier.weight[start:end] = weight[start:end]
                self.classifier.bias[start:end] = bias[start:end]

            @torch.no_grad()
            def adaptation(self, experience):
                old = self.classifier.out_features
                super().adaptation(experience)
                if self.classifier.out_features > old:
                    self.take_rows(old)

        class AvalancheClassNet(nn.Module):
            def __init__(self, features: nn.Module, in_features: int, initial: int):
                super().__init__()
                self.features = features
                self.classifier = TableAvalancheIncremental(in_features, initial)

            def forward(self, x):
                return self.classifier(self.features(x))

        class TableMultiHead(models.MultiHeadClassifier):
            """Avalanche's MultiHeadClassifier whose head for task t takes the table's rows t * w ... (t + 1) * w."""

            def __init__(self, in_features: int, width: int):
                super().__init__(in_features, initial_out_features=width)
                self.width = width
                self.initialised: set[str] = set()
                self.take_rows()

            @torch.no_grad()
            def take_rows(self) -> None:
                for tid, head in self.classifiers.items():
                    if tid in self.initialised:
                        continue
                    start, n = int(tid) * self.width, head.classifier.out_features
                    head.classifier.weight.copy_(weight[start:start + n])
                    head.classifier.bias.copy_(bias[start:start + n])
                    self.initialised.add(tid)

            def adaptation(self, experience):
                super().adaptation(experience)
                self.take_rows()

        class AvalancheTaskNet(models.MultiTaskModule):
            """The shape of Avalanche's MTSimpleMLP: shared features, then a multi-head classifier."""

            def __init__(self, features: nn.Module, in_features: int, width: int):
                super().__init__()
                self.features = features
                self.classifier = TableMultiHead(in_features, width)

            def forward(self, x, task_labels):
                return self.classifier(self.features(x), task_labels)

        return {"class": AvalancheClassNet, "task": AvalancheTaskNet}

    def model(self) -> nn.Module:
        setup = self.setup
        features = copy.deepcopy(setup.encoder().net)  # the encoder's nn.Sequential: Flatten, Linear, ReLU, ...
        if setup.stream.setting == "task":
            return self.classes["task"](features, setup.features, setup.width)
        return self.classes["class"](features, setup.features, len(setup.stream[0].classes))

    def strategy(self, name: str, model: nn.Module, epochs: int):
        m, args, options = self.mods, self.setup.args, self.setup.options[name]
        training, plugins = m["avalanche.training"], m["avalanche.training.plugins"]
        evaluator = plugins.EvaluationPlugin(m["avalanche.evaluation.metrics"].accuracy_metrics(experience=True),
                                             loggers=[])
        common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM),
                      criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size, train_epochs=epochs,
                      eval_mb_size=EVAL_BATCH, device="cpu", evaluator=evaluator, eval_every=-1)
        if name == "finetune":
            return training.Naive(**common)
        if name == "ewc":
            return training.EWC(ewc_lambda=options["strength"] / 2, mode="separate", **common)
        if name == "er":
            size = options["buffer_size"]
            buffer = m["avalanche.training.storage_policy"].ReservoirSamplingBuffer(max_size=size)
            return training.Naive(plugins=[plugins.ReplayPlugin(mem_size=size, storage_policy=buffer)], **common)
        if name == "lwf":
            return training.LwF(alpha=options["alpha"], temperature=options["temperature"], **common)
        raise ValueError(f"no Avalanche counterpart for {name!r}")

    def run(self, name: str, epochs: int) -> tuple[float, list[list[float]]]:
        """One whole stream with Avalanche: (wall seconds, accuracy rows after each experience)."""
        with warnings.catch_warnings():
            # Avalanche's @deprecated wrapper turns DeprecationWarning back on at every call (ReplayPlugin calls
            # its buffer's deprecated update() after each experience): silence the printing instead.
            warnings.simplefilter("ignore")
            warnings.showwarning = _no_show
            started = time.perf_counter()
            strategy = self.strategy(name, self.model(), epochs)
            test = self.benchmark.test_stream
            rows = []
            for i, experience in enumerate(self.benchmark.train_stream):
                strategy.train(experience, eval_streams=[], reset_optimizer_state=True)
                metrics = strategy.eval(test[: i + 1])
                rows.append(experience_accuracies(metrics, i + 1))
            return time.perf_counter() - started, rows


def _no_show(*args, **kwargs) -> None:
    """A ``warnings.showwarning`` that prints nothing."""


@torch.no_grad()
def same_start_check(setup: Setup, peer: AvalancheSide) -> dict:
    """Both untrained models, given each experience's head or classes in turn (no training in between), give the
    same logits on that experience's first test images: every unit starts from the same weights on both sides."""
    adapt = peer.mods["avalanche.models"].utils.avalanche_model_adaptation
    learner, model = our_learner(setup), peer.model()
    model.train()  # Avalanche marks a new class's unit active only in training mode
    worst, task = 0.0, setup.stream.setting == "task"
    for ours, theirs in zip(setup.stream, peer.benchmark.train_stream):
        learner.prepare(ours)
        adapt(model, theirs)
        x = torch.stack([ours.test[i][0] for i in range(min(64, len(ours.test)))])
        t = torch.full((len(x),), ours.task_id, dtype=torch.long)
        mine = learner.logits(learner.model, learner.encode(learner.model, x, t), t)
        other = model(x, t) if task else model(x)
        width = mine.shape[1] if not task else len(ours.classes)
        worst = max(worst, float((mine[:, :width] - other[:, :width]).abs().max()))
    return {"max_abs_logit_diff": worst, "same": worst <= 1e-5,
            "what": "logits of both untrained models on the first 64 test images of each experience, after each "
                    "side added that experience's head or classes"}


def experience_accuracies(metrics: dict, count: int) -> list[float]:
    """Accuracies on experiences 0 .. count - 1 from Avalanche's ``Top1_Acc_Exp/.../Exp00j`` metrics."""
    found = {}
    for key, value in metrics.items():
        hit = re.fullmatch(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)", key)
        if hit:
            found[int(hit.group(1))] = float(value)
    missing = [j for j in range(count) if j not in found]
    if missing:
        raise RuntimeError(f"Avalanche reported no experience accuracy for experience(s) {missing}: {sorted(metrics)}")
    return [found[j] for j in range(count)]


# ----- timing ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def one_run(side: str, name: str, setup: Setup, peer: AvalancheSide | None, threads: int, epochs: int) -> dict:
    ensure_threads(threads)
    gc.collect()
    seed_everything(setup.args.seed)
    if side == "ours":
        seconds, rows = our_run(setup, name, setup.args.tmp_dir, epochs)
    else:
        seconds, rows = peer.run(name, epochs)
    return {"seconds": seconds, "rows": rows, "acc": statistics.fmean(rows[-1])}


def measure(setup: Setup, peer: AvalancheSide | None, threads: int) -> tuple[dict, dict]:
    """Warm-up runs, then ``rounds`` rounds: every strategy, ours and Avalanche's in turn (order swapped in odd
    rounds). Returns ``{strategy: {side: [run, ...]}}`` for the warm-up and the timed rounds."""
    args = setup.args
    sides = SIDES if peer is not None else ("ours",)
    warm = {n: {s: [] for s in sides} for n in args.strategies}
    timed = {n: {s: [] for s in sides} for n in args.strategies}
    for w in range(args.warmup):
        for name in args.strategies:
            for side in sides:
                run = one_run(side, name, setup, peer, threads, WARMUP_EPOCHS)
                warm[name][side].append(run)
                print(f"  warm-up {w + 1}/{args.warmup} ({WARMUP_EPOCHS} epoch) {name:<8} {side:<9} "
                      f"{run['seconds']:6.2f} s  ACC {100 * run['acc']:5.2f} %", flush=True)
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else tuple(reversed(sides))
        parts = []
        for name in args.strategies:
            for side in order:
                timed[name][side].append(one_run(side, name, setup, peer, threads, args.epochs))
            parts.append(f"{name} " + " / ".join(f"{timed[name][s][-1]['seconds']:.2f}" for s in sides))
        print(f"  round {r + 1}/{args.rounds} (s, {' / '.join(sides)}): " + ", ".join(parts), flush=True)
    return warm, timed


# ----- figures and report ------------------------------------------------------------------------


def side_figures(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    accs = [r["acc"] for r in runs]
    return {"round_s": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "spread_max_over_min": max(seconds) / min(seconds), "acc": statistics.median(accs), "round_acc": accs,
            "acc_same_every_round": max(accs) - min(accs) < 1e-12, "final_row": runs[-1]["rows"][-1],
            "matrix": runs[-1]["rows"]}


def figures(timed: dict, peer_reason: str | None) -> dict:
    out = {}
    for name, by_side in timed.items():
        entry = {side: side_figures(runs) for side, runs in by_side.items()}
        if "avalanche" in by_side:
            ours, theirs = entry["ours"]["round_s"], entry["avalanche"]["round_s"]
            ratios = [a / b for a, b in zip(ours, theirs)]
            value = entry["ours"]["median_s"] / entry["avalanche"]["median_s"]
            entry["ratio"] = {"value": value, "round_ratios": ratios, "median_round_ratio": statistics.median(ratios),
                              "spread_max_over_min": max(ratios) / min(ratios), "limit": TARGET,
                              "verdict": "PASS" if value <= TARGET else "ABOVE TARGET"}
        else:
            entry["ratio"] = {"limit": TARGET, "verdict": "SKIPPED", "reason": peer_reason}
        out[name] = entry
    return out


def noisy_entries(figs: dict) -> list[str]:
    bad = []
    for name, entry in figs.items():
        for side in SIDES:
            f = entry.get(side)
            if f and len(f["round_s"]) > 1 and f["spread_max_over_min"] > NOISY_SPREAD:
                bad.append(f"{name} {side} times {f['spread_max_over_min']:.2f}x")
        r = entry["ratio"]
        if r["verdict"] != "SKIPPED" and len(r["round_ratios"]) > 1 and r["spread_max_over_min"] > NOISY_SPREAD:
            bad.append(f"{name} ratios {r['spread_max_over_min']:.2f}x")
    return bad


def acc_cell(f: dict | None) -> str:
    if not f:
        return ""
    text = f"{100 * f['acc']:.2f}"
    if not f["acc_same_every_round"]:
        text += f" ({100 * min(f['round_acc']):.2f}-{100 * max(f['round_acc']):.2f})"
    return text


def table_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, e in result["strategies"].items():
        o, a, r = e["ours"], e.get("avalanche"), e["ratio"]
        skipped = r["verdict"] == "SKIPPED"
        rows.append((name, AVALANCHE_NAME_SHORT[name], f"{o['median_s']:.2f}",
                     "" if skipped else f"{a['median_s']:.2f}",
                     "" if skipped else f"{r['value']:.3f}", "SKIPPED" if skipped else r["verdict"],
                     acc_cell(o), acc_cell(a),
                     "" if skipped else ", ".join(f"{x:.2f}" for x in r["round_ratios"])))
    return rows


AVALANCHE_NAME_SHORT = {"finetune": "Naive", "ewc": "EWC", "er": "Naive + ReplayPlugin (reservoir)", "lwf": "LwF"}
HEADER = ("strategy", "Avalanche", "ours (s)", "Avalanche (s)", "ours / Avalanche", "target <= 0.5", "ACC ours (%)",
          "ACC Avalanche (%)", "per-round ratios")


def write_markdown(path: Path, result: dict) -> None:
    m, cfg = result["machine"], result["config"]
    versions = result["peer"].get("versions") or {}
    rows = [
        f"# Continual learning: whole Split-MNIST streams against Avalanche ({cfg['setting']}-IL)",
        "",
        f"CPU, {m['torch_threads']} torch thread(s), {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, "
        f"{m['memory_gib']} GiB, torch {m['torch']}"
        + (f", avalanche-lib {versions.get('avalanche-lib')}" if versions else "")
        + f". {result['data']['stream']}. Model: {result['data']['model']}. {cfg['epochs']} epoch(s) per experience, "
        f"batch {cfg['batch_size']}, SGD lr {cfg['lr']} momentum {cfg['momentum']} (reset at each experience), "
        f"seed {cfg['seed']}. Strategy settings: " + "; ".join(
            f"{n} {', '.join(f'{k}={v}' for k, v in o.items() if k != 'seed') or '-'}"
            for n, o in cfg["strategy_options"].items()) + ".",
        "",
        f"{cfg['warmup']} untimed warm-up stream(s) ({WARMUP_EPOCHS} epoch per experience) per (strategy, side), then "
        f"{cfg['rounds']} rounds; in each, every "
        "strategy runs ours then Avalanche's (swapped in odd rounds), one whole stream each (model and strategy built, "
        "five experiences trained, evaluation after each). Times: median over rounds; ratio: median of ours over "
        "median of Avalanche's. ACC: mean accuracy over the five experiences after the last one (the same in every "
        "round unless a range is given).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    rows += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    skipped = [e["ratio"]["reason"] for e in result["strategies"].values() if e["ratio"]["verdict"] == "SKIPPED"]
    if skipped:
        rows += ["", f"**SKIPPED**: {skipped[0]}"]
    rows += ["", "Accuracy on each experience after the last one (%):", "",
             "| strategy | ours | Avalanche |", "|---|---|---|"]
    for name, e in result["strategies"].items():
        a = e.get("avalanche")
        rows.append(f"| {name} | {', '.join(f'{100 * v:.1f}' for v in e['ours']['final_row'])} | "
                    + (", ".join(f"{100 * v:.1f}" for v in a["final_row"]) if a else "") + " |")
    rows += ["", "## What each side runs", "", f"- Ours: {OUR_RUN}.", f"- Avalanche: {AVALANCHE_RUN}."]
    rows += [f"- {name}: ours `build_strategy('{name}')`, Avalanche {AVALANCHE_CLASSES[name]}."
             for name in result["strategies"]]
    rows += ["", "## Where the two sides differ", ""] + [f"- {d}" for d in DIFFERENCES]
    if versions:
        rows += ["", "Avalanche and the packages it imports, installed with `--no-deps` into "
                 f"`{result['peer']['dir']}` (this environment's torch, numpy, scikit-learn, ... are used): "
                 + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    load = result["load_average_1_5_15min"]
    rows += ["", f"Load average (1, 5, 15 min): start {load['start']}, end {load['end']}."]
    if result["noisy"]:
        rows.append(f"**Noisy run** (spread above {NOISY_SPREAD}x: {'; '.join(result['noisy_reasons'])}); "
                    "treat the ratios with caution.")
    rows += ["", f"Total wall time {result['wall_s']:.0f} s.", "", f"Command: `{result['command']}`", ""]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


def print_summary(result: dict, out: Path) -> None:
    rows = [HEADER[:8]] + [r[:8] for r in table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    load = result["load_average_1_5_15min"]
    print(f"load average (1, 5, 15 min): start {load['start']}, end {load['end']}")
    if result["noisy"]:
        print(f"NOISY: {'; '.join(result['noisy_reasons'])} (max / min within this run). The machine was busy; "
              "rerun when it is quiet, or with more --rounds.")
    print(f"results: {out / 'avalanche.json'}, {out / 'avalanche.md'} ({result['wall_s']:.0f}s)")
    skipped = [name for name, e in result["strategies"].items() if e["ratio"]["verdict"] == "SKIPPED"]
    if skipped:
        print(f"SKIPPED: the comparison with Avalanche ({', '.join(skipped)}): "
              f"{result['strategies'][skipped[0]]['ratio']['reason']}")
    for name, e in result["strategies"].items():
        r = e["ratio"]
        if r["verdict"] != "SKIPPED":
            print(f"{r['verdict']}: {name}: our stream time / Avalanche's = {r['value']:.3f} (target <= {TARGET}); "
                  f"ACC ours {100 * e['ours']['acc']:.2f} %, Avalanche {100 * e['avalanche']['acc']:.2f} %")


# ----- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install_peer and not install_into(args.peer_dir, PEER_REQUIREMENTS, "avalanche-lib"):
        print(f"installing avalanche-lib into {args.peer_dir} failed (see pip's output above)", file=sys.stderr)
        return 1
    for name in ("mtl", "continual", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    threads_default = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = load_average()
    start = time.perf_counter()
    print(f"torch threads: {threads} (default {threads_default}); load average {load_start}", flush=True)

    setup = Setup(args)
    mods, peer_reason = load_peer(args.peer_dir)
    peer = None
    if mods:
        try:
            peer = AvalancheSide(mods, setup)
        except Exception as e:
            peer_reason = f"building Avalanche's benchmark failed: {type(e).__name__}: {e}"
    if peer is None:
        print(f"avalanche: {peer_reason}\n  pip command: {shlex.join(pip_target_command(args.peer_dir, PEER_REQUIREMENTS))}\n"
              "  the comparison is SKIPPED; our side is still measured", flush=True)
    print(f"data: {setup.describe()['stream']}", flush=True)
    check = same_start_check(setup, peer) if peer is not None else None
    if check:
        print(f"same start: largest logit difference between the untrained models {check['max_abs_logit_diff']:.1e}: "
              f"{'same' if check['same'] else 'DIFFERENT'}", flush=True)

    warm, timed = measure(setup, peer, threads)
    load_end = load_average()
    figs = figures(timed, peer_reason)
    noisy = noisy_entries(figs)
    result = {
        "benchmark": "avalanche",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/bench_vs_avalanche.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "config": {"strategies": args.strategies, "setting": args.setting, "rounds": args.rounds,
                   "warmup": args.warmup, "warmup_epochs": WARMUP_EPOCHS, "epochs": args.epochs,
                   "batch_size": args.batch_size, "lr": args.lr,
                   "momentum": MOMENTUM, "optimizer": "sgd", "eval_batch_size": EVAL_BATCH, "seed": args.seed,
                   "threads": args.threads, "device": "cpu",
                   "strategy_options": {n: setup.options[n] for n in args.strategies},
                   "avalanche_ewc_lambda": setup.options["ewc"]["strength"] / 2},
        "data": setup.describe(),
        "timed": {"ours": OUR_RUN, "avalanche": AVALANCHE_RUN,
                  "avalanche_strategies": {n: AVALANCHE_CLASSES[n] for n in args.strategies}},
        "differences": DIFFERENCES,
        "peer": {"dir": shown_path(args.peer_dir), "install_command": shlex.join(pip_target_command(args.peer_dir, PEER_REQUIREMENTS)),
                 "versions": peer_versions(args.peer_dir) if peer is not None else None, "unavailable": peer_reason},
        "machine": machine_info(torch_threads_default=threads_default, torch_threads=threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": bool(noisy),
        "noisy_reasons": noisy,
        "target": f"our whole-stream time / Avalanche's <= {TARGET} (per strategy)",
        "same_start_check": check,
        "strategies": figs,
        "warmup_runs": {n: {s: [{"seconds": r["seconds"], "acc": r["acc"]} for r in runs] for s, runs in by.items()}
                        for n, by in warm.items()},
        "wall_s": time.perf_counter() - start,
    }
    out = save_results(args.out_dir, "avalanche", result, write_markdown)
    print_summary(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
