"""Train a model of the zoo on real MNIST and write a checkpoint plus a PNG of its curves.

python -m training.train --model mnist_cnn
torchrun --nproc-per-node 2 -m training.train --model mnist_cnn   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.checkpoint import CheckpointConfig, save_checkpoint
from training.cli import HelpFormatter
from training.data import load_dataset
from training.mnist import MEAN, STD
from training.models import MODELS, ModelSpec, get_spec
from training.models.layers import ACTIVATIONS
from training.recipe import RECIPES, Recipe, make_optimizer, random_affine, resolve_recipe

BACKGROUND = -MEAN / STD  # a black pixel, normalised: what augmentation shifts in at the borders


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, *spatial] -> normalised float32 [N, 1, *spatial]."""
    x = torch.from_numpy(pixels).float().div_(255.0).unsqueeze(1)
    return (x - MEAN) / STD


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (a single process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in state-dict order."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = (
                x[start : start + batch_size].to(device),
                y[start : start + batch_size].to(device),
            )
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
    return loss / len(x), correct / len(x)


def plot_curves(metrics: dict[str, Any], path: Path, title: str) -> None:
    """Training loss per step and test accuracy per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, losses = (
        zip(*metrics["train_loss_curve"], strict=True) if metrics["train_loss_curve"] else ((), ())
    )
    ax_loss.plot(steps, losses, color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss (running mean)", yscale="log", title="loss")
    epochs = [e["epoch"] for e in metrics["epochs"]]
    acc = [100 * e["test_accuracy"] for e in metrics["epochs"]]
    ax_acc.plot(epochs, acc, marker="o", color="tab:green")
    for e, a in zip(epochs, acc, strict=True):
        ax_acc.annotate(f"{a:.2f}%", (e, a), textcoords="offset points", xytext=(0, 6), ha="center")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="MNIST test set")
    ax_acc.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Splits:
    """A dataset's training and test inputs (normalised float tensors), labels and class names."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]


@dataclass
class LossCurve:
    """The running training loss: a point every 20 steps and at the end of each epoch."""

    step: int = 0
    running: float | None = None
    points: list[tuple[int, float]] = field(default_factory=list)

    def add(self, value: float, epoch_end: bool) -> bool:
        """Count one step's loss; True when it also added a point to the curve."""
        self.step += 1
        self.running = value if self.running is None else 0.95 * self.running + 0.05 * value
        if self.step % 20 == 0 or epoch_end:
            self.points.append((self.step, self.running))
            return True
        return False


def choose_device(args: argparse.Namespace) -> tuple[torch.device, Distributed]:
    """The one place that decides the device (and joins a torchrun job when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.set_num_threads(args.threads)
    ddp = Distributed.from_env(device)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.rank % torch.cuda.device_count())
    return device, ddp


def load_splits(dataset: str, test_limit: int) -> Splits:
    """Both splits of `dataset` as tensors; the test split cut to `test_limit` items when set."""
    train_x, train_y, labels = load_dataset(dataset, "train")
    test_x, test_y, _ = load_dataset(dataset, "test")
    if test_limit:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    return Splits(
        x_train=to_tensor(train_x),
        y_train=torch.from_numpy(train_y),
        x_test=to_tensor(test_x),
        y_test=torch.from_numpy(test_y),
        labels=labels,
    )


def epoch_order(count: int, seed: int, ddp: Distributed) -> torch.Tensor:
    """This process's share of an epoch: every rank draws the same permutation, takes its stride."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[ddp.rank :: ddp.world_size]


def progress_bar(steps: int, desc: str, show: bool) -> tqdm:
    """The steps of one epoch, with a progress bar on the terminal (or in a log every 5 s)."""
    return tqdm(
        range(steps),
        desc=desc,
        disable=not show,
        unit="step",
        leave=False,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,
    )


@dataclass
class Step:
    """What one training step needs besides the batch: the recipe, its optimiser and schedule."""

    recipe: Recipe
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: torch.Generator  # draws the augmentation's shifts and angles, seeded

    def after_batch(self) -> None:
        if self.recipe.schedule == "onecycle":
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.recipe.schedule == "step":
            self.scheduler.step()


def train_epoch(
    net: nn.Module,
    step: Step,
    data: Splits,
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    curve: LossCurve,
    bar: tqdm,
) -> None:
    """One pass over this process's share (`order`) of the training set, a batch per bar step."""
    net.train()
    recipe = step.recipe
    last = len(bar) - 1
    for i in bar:
        idx = order[i * batch_size : (i + 1) * batch_size]
        xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
        if recipe.augments:
            xb = random_affine(xb, step.augment, recipe.max_shift, recipe.max_rotation, BACKGROUND)
        step.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xb), yb, label_smoothing=recipe.label_smoothing)
        loss.backward()
        step.optimizer.step()
        step.after_batch()
        if curve.add(loss.item(), epoch_end=i == last):
            bar.set_postfix(loss=f"{curve.running:.4f}")


def evaluate_epoch(
    model: nn.Module,
    data: Splits,
    device: torch.device,
    batch_size: int,
    curve: LossCurve,
    epoch_started: float,
) -> dict[str, Any]:
    """The epoch's training loss, test loss and accuracy, and its seconds (evaluation included)."""
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, device, batch_size)
    return {
        "train_loss": curve.running,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "seconds": time.perf_counter() - epoch_started,
    }


def gather_digests(model: nn.Module, ddp: Distributed) -> list[str | None]:
    """Every rank's weights digest, in rank order: DDP must leave them identical."""
    digests: list[str | None] = [None] * ddp.world_size
    dist.all_gather_object(digests, weights_digest(model))
    return digests


def save_outputs(
    args: argparse.Namespace,
    model: nn.Module,
    config: CheckpointConfig,
    labels: list[str],
    metrics: dict[str, Any],
) -> None:
    """The checkpoint, its curves as PNG (unless --no-plot) and the metrics as JSON."""
    out = Path(args.out or f"checkpoints/{config.model}.pt")
    save_checkpoint(
        out,
        model,
        config,
        mean=MEAN,
        std=STD,
        labels=labels,
        metrics=metrics,
        train_args={k: v for k, v in vars(args).items() if v is not None},
    )
    print(
        f"checkpoint: {out} (test accuracy {100 * metrics['test_accuracy']:.2f}%, {metrics['train_seconds']:.0f} s)"
    )
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot_curves(metrics, png, f"{config.model} on MNIST")
        print(f"curves: {png}")
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training loop; returns the metrics (rank 0 also writes the checkpoint)."""
    spec: ModelSpec = get_spec(args.model)
    epochs = args.epochs if args.epochs is not None else spec.epochs
    recipe = resolve_recipe(spec, args.recipe, args.lr, args.gamma)
    device, ddp = choose_device(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = load_splits(spec.dataset, args.test_limit)

    build_kwargs = (
        {**spec.build_kwargs, "activation": args.activation}
        if args.activation
        else dict(spec.build_kwargs)
    )
    model: nn.Module = spec.build(num_classes=len(data.labels), **build_kwargs).to(device)
    params = sum(p.numel() for p in model.parameters())
    net = nn.parallel.DistributedDataParallel(model) if ddp.world_size > 1 else model

    steps_per_epoch = math.ceil(len(data.x_train) / (args.batch_size * ddp.world_size))
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    optimizer, scheduler = make_optimizer(recipe, net, epochs * steps_per_epoch)
    # Each rank its own augmentation draws, all of them fixed by the seed.
    augment = torch.Generator().manual_seed(args.seed * 1000 + ddp.rank)
    step = Step(recipe, optimizer, scheduler, augment)
    curve = LossCurve()
    metrics: dict[str, Any] = {"epochs": [], "train_loss_curve": curve.points, "params": params}
    if ddp.is_main:
        print(
            f"{spec.name}: {params:,} parameters, {epochs} epoch(s) x {steps_per_epoch} steps, "
            f"batch {args.batch_size} x {ddp.world_size} process(es), {recipe.name} recipe "
            f"({recipe.optimizer} lr {recipe.lr}, {recipe.schedule} schedule), device {device}"
        )
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        train_epoch(
            net,
            step,
            data,
            epoch_order(len(data.x_train), args.seed + epoch, ddp),
            args.batch_size,
            device,
            curve,
            progress_bar(
                steps_per_epoch, f"epoch {epoch}/{epochs}", ddp.is_main and not args.quiet
            ),
        )
        step.after_epoch()
        if ddp.is_main:
            result = evaluate_epoch(model, data, device, args.test_batch_size, curve, epoch_started)
            metrics["epochs"].append({"epoch": epoch, **result})
            print(
                f"epoch {epoch}/{epochs}: train loss {result['train_loss']:.4f}, "
                f"test loss {result['test_loss']:.4f}, test accuracy "
                f"{100 * result['test_accuracy']:.2f}% ({len(data.x_test)} images), "
                f"{result['seconds']:.1f} s"
            )
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["test_accuracy"] = metrics["epochs"][-1]["test_accuracy"] if metrics["epochs"] else None
    metrics["world_size"] = ddp.world_size
    if ddp.world_size > 1:
        metrics["rank_weight_digests"] = gather_digests(model, ddp)
    if ddp.is_main:
        config = CheckpointConfig(
            model=spec.name,
            input_shape=spec.input_shape,
            gradcam_layer=spec.gradcam_layer,
            num_classes=len(data.labels),
            build_kwargs=build_kwargs,
            recipe=recipe.to_dict(),
        )
        save_outputs(args, model, config, data.labels, metrics)
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return metrics


def _learning_rates() -> str:
    """Every model's default optimizer and learning rate, models that share one grouped."""
    groups: dict[tuple[str, float], list[str]] = {}
    for name, spec in sorted(MODELS.items()):
        groups.setdefault((spec.optimizer, spec.lr), []).append(name)
    names = {"adadelta": "Adadelta", "adamw": "AdamW"}
    return "; ".join(
        f"{names.get(opt, opt)} {lr} for {', '.join(models)}"
        for (opt, lr), models in groups.items()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a CNN of the zoo on MNIST and write a checkpoint (weights, config, "
        "normalisation, labels, metrics) and a PNG of its training curves.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default="mnist_cnn", choices=sorted(MODELS), help="architecture")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default: the model's own: "
        + ", ".join(f"{name} {spec.epochs}" for name, spec in sorted(MODELS.items()))
        + ")",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    parser.add_argument(
        "--test-batch-size", type=int, default=1000, help="batch size for evaluation"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: the model's own: " + _learning_rates() + ")",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default=None,
        help="training recipe (default: the model's: "
        + ", ".join(f"{name} {spec.recipe}" for name, spec in sorted(MODELS.items()))
        + "); classic: Adadelta (convnext AdamW), lr x gamma every epoch; modern: AdamW "
        "one-cycle, label smoothing 0.1, random shifts <= 2 px and rotations <= 10 degrees",
    )
    parser.add_argument(
        "--gamma", type=float, default=0.7, help="learning-rate decay per epoch (classic recipe)"
    )
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, default=None, help="activation (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (same seed, same weights)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="cap steps per epoch (0: full epochs); for quick runs",
    )
    parser.add_argument(
        "--test-limit",
        type=int,
        default=0,
        help="evaluate on the first N test images only (0: all 10,000)",
    )
    parser.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch intra-op threads"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even when CUDA is available"
    )
    parser.add_argument(
        "--out", default=None, help="checkpoint path (default: checkpoints/<model>.pt)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG of training curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs too
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
