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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.checkpoint import save_checkpoint
from training.data import MEAN, STD, load_dataset
from training.models import MODELS, ModelSpec, get_spec
from training.models.layers import ACTIVATIONS


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


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training loop; returns the metrics (rank 0 also writes the checkpoint)."""
    spec: ModelSpec = get_spec(args.model)
    epochs = args.epochs if args.epochs is not None else spec.epochs
    lr = args.lr if args.lr is not None else spec.lr
    # One place decides the device.
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.set_num_threads(args.threads)
    ddp = Distributed.from_env(device)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.rank % torch.cuda.device_count())
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    train_x, train_y, labels = load_dataset(spec.dataset, "train")
    test_x, test_y, _ = load_dataset(spec.dataset, "test")
    if args.test_limit:
        test_x, test_y = test_x[: args.test_limit], test_y[: args.test_limit]
    x_train, y_train = to_tensor(train_x), torch.from_numpy(train_y)
    x_test, y_test = to_tensor(test_x), torch.from_numpy(test_y)

    build_kwargs = (
        {**spec.build_kwargs, "activation": args.activation}
        if args.activation
        else dict(spec.build_kwargs)
    )
    model: nn.Module = spec.build(num_classes=len(labels), **build_kwargs).to(device)
    params = sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    if ddp.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    optimizer: torch.optim.Optimizer
    if spec.optimizer == "adamw":
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.Adadelta(net.parameters(), lr=lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)

    steps_per_epoch = math.ceil(len(x_train) / (args.batch_size * ddp.world_size))
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    metrics: dict[str, Any] = {"epochs": [], "train_loss_curve": [], "params": params}
    if ddp.is_main:
        print(
            f"{spec.name}: {params:,} parameters, {epochs} epoch(s) x {steps_per_epoch} steps, "
            f"batch {args.batch_size} x {ddp.world_size} process(es), {spec.optimizer} lr {lr}, device {device}"
        )
    started = time.perf_counter()
    step, running = 0, None
    for epoch in range(1, epochs + 1):
        net.train()
        # Every rank draws the same permutation and takes its own stride of it.
        order = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch)
        )
        order = order[ddp.rank :: ddp.world_size]
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{epochs}",
            disable=not ddp.is_main or args.quiet,
            unit="step",
            leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 5.0,  # a log file gets a line every 5 s
        )
        epoch_started = time.perf_counter()
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            optimizer.step()
            step += 1
            value = loss.item()
            running = value if running is None else 0.95 * running + 0.05 * value
            if step % 20 == 0 or i == steps_per_epoch - 1:
                metrics["train_loss_curve"].append((step, running))
                bar.set_postfix(loss=f"{running:.4f}")
        scheduler.step()
        if ddp.is_main:
            test_loss, test_acc = evaluate(model, x_test, y_test, device, args.test_batch_size)
            seconds = time.perf_counter() - epoch_started
            metrics["epochs"].append(
                {
                    "epoch": epoch,
                    "train_loss": running,
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "seconds": seconds,
                }
            )
            print(
                f"epoch {epoch}/{epochs}: train loss {running:.4f}, test loss {test_loss:.4f}, "
                f"test accuracy {100 * test_acc:.2f}% ({len(x_test)} images), {seconds:.1f} s"
            )
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["test_accuracy"] = metrics["epochs"][-1]["test_accuracy"] if metrics["epochs"] else None
    metrics["world_size"] = ddp.world_size
    if ddp.world_size > 1:
        # Every rank reports a digest of its weights: DDP must leave them identical.
        digest = weights_digest(model)
        digests: list[str | None] = [None] * ddp.world_size
        dist.all_gather_object(digests, digest)
        metrics["rank_weight_digests"] = digests
    if ddp.is_main:
        out = Path(args.out or f"checkpoints/{spec.name}.pt")
        save_checkpoint(
            out,
            model,
            spec,
            build_kwargs=build_kwargs,
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
            plot_curves(metrics, png, f"{spec.name} on MNIST")
            print(f"curves: {png}")
        out.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return metrics


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones: their help says what the model picks instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a CNN of the zoo on MNIST and write a checkpoint (weights, config, "
        "normalisation, labels, metrics) and a PNG of its training curves.",
        formatter_class=_HelpFormatter,
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
        help="learning rate (default: the model's: Adadelta 1.0 for mnist_cnn, AdamW 2e-3 for convnext)",
    )
    parser.add_argument("--gamma", type=float, default=0.7, help="learning-rate decay per epoch")
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
