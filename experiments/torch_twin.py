"""The CIFAR ResNet of the benchmarks in PyTorch (upstream SalUn's layout, PyTorch's default
init), its train step, and runners that time it in a process of its own
(experiments/bench_train.py --conv_impls). Optional: needs torch (`pip install -e .[bench]`)."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from salun_jax.cpu import host_memory

_NUM_CLASSES = 10


def resnet(stage_sizes, width: float, num_classes: int, mean, std):
    """The same CIFAR ResNet in PyTorch (upstream SalUn's layout and PyTorch's default init)."""
    import torch  # noqa: PLC0415 (optional)
    from torch import nn as tnn  # noqa: PLC0415

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.shortcut = tnn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            base = max(1, int(round(64 * width)))
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
            self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(base)
            blocks, cin = [], base
            for stage, count in enumerate(stage_sizes):
                for block in range(count):
                    stride = 2 if stage > 0 and block == 0 else 1
                    blocks.append(Block(cin, base * 2**stage, stride))
                    cin = base * 2**stage
            self.layers = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
            return self.fc(self.layers(x).mean(dim=(2, 3)))

    return Net()


STAGES = {"resnet18": (2, 2, 2, 2), "resnet8": (1, 1, 1)}


def step_fn(model_name: str, width: float, batch: dict, channels_last: bool):
    """One PyTorch train step (SGD, momentum 0.9, wd 5e-4, cross-entropy) on a fixed batch;
    None for a model without a PyTorch twin here."""
    import torch  # noqa: PLC0415 (optional)

    if model_name not in STAGES:
        return None
    torch.manual_seed(0)
    net = resnet(STAGES[model_name], width, _NUM_CLASSES, (0.5,) * 3, (0.25,) * 3)
    images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    images = images.float() / 255.0
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(batch["label"].astype(np.int64))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _worker(connection, model_name: str, width: float, batch: dict) -> None:
    """PyTorch's steps, in a process of their own (see `runners`): sends
    ("ready", torch version, layouts) or ("skip", why), then for each (layout, count) received
    runs that many steps and sends their seconds, until it receives None."""
    # The same malloc settings as this process (PyTorch's step had them when it ran here).
    host_memory.keep_freed_host_memory()
    try:
        import torch  # noqa: PLC0415 (optional)
    except ImportError:
        connection.send(("skip", "torch is not importable: PyTorch rows skipped"))
        return
    steps = {}
    for layout, channels_last in (("NCHW", False), ("channels_last", True)):
        step = step_fn(model_name, width, batch, channels_last)
        if step is None:
            connection.send(("skip", f"no PyTorch twin of {model_name}: PyTorch rows skipped"))
            return
        steps[layout] = step
    connection.send(("ready", torch.__version__, list(steps)))
    while (request := connection.recv()) is not None:
        layout, count = request
        start = time.perf_counter()
        for _ in range(count):
            steps[layout]()
        connection.send(time.perf_counter() - start)


def runners(model_name: str, width: float, batch: dict):
    """(torch version, {"torch <layout>": run(count)}, close) with PyTorch in a child process,
    or (None, {}, close) without it. Why a process of its own: oneDNN's OpenMP threads
    (the CPU wing's "onednn") and PyTorch's share one libgomp in a process, and PyTorch's step, run
    after ours in the same process, was ~20% slower on 2 cores (656 -> 534 img/s, NCHW) and
    stayed so. Each runner returns the child's own timing of its steps."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_worker, args=(child, model_name, width, batch))
    process.start()
    message = parent.recv()
    if message[0] == "skip":  # the worker has returned
        print(f"  {message[1]}", flush=True)
        process.join()
        return None, {}, lambda: None

    def close():
        parent.send(None)
        process.join()

    def runner(layout):
        def run(count):
            parent.send((layout, count))
            return parent.recv()

        return run

    _, version, layouts = message
    return version, {f"torch {layout}": runner(layout) for layout in layouts}, close
