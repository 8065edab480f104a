"""One pass of a model over this rank's shard of a split: the loop every streamed computation shares.

Evaluation, QPM's feature statistics, the feature shards of the glm-based methods, the interpretability metrics and the
report's example search all need the same thing: the model in eval mode, no gradients, each batch moved to the
device and run under the run's autocast, progress on rank 0 (`utils.progress`: a bar on a terminal, log lines
in a log file, nothing with engine.progress=false). What each of them does with an output is
its own business (an accumulator, a sum, a shard writer); the loop is written once, here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from qpm_dist.dist import DistInfo
from qpm_dist.engine.preemption import stop_point
from qpm_dist.utils import progress

Autocast = Callable[[], contextlib.AbstractContextManager]


@torch.no_grad()
def model_outputs(model: nn.Module, loader: Iterable, info: DistInfo, autocast: Autocast, desc: str = "",
                  prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[tuple]:
    """Yield (model output, labels on the device, *the loader's other fields) for every batch of `loader`.

    The model is put in eval mode for the pass and back into its previous mode afterwards. `prepare` moves the
    images (default: to the device); a strategy passes its own (memory format, input dtype). A stop signal
    (SIGTERM/SIGUSR1) ends the pass at the next batch boundary (`engine.preemption.stop_point`)."""
    was_training = model.training
    model.eval()
    prepare = prepare or (lambda images: images.to(info.device, non_blocking=True))
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = progress(total, desc, show=info.is_main and bool(desc))
    try:
        for images, labels, *rest in loader:
            stop_point()
            images, labels = prepare(images), labels.to(info.device, non_blocking=True)
            with autocast():
                output = model(images)
            yield (output, labels, *rest)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
