"""POST /api/train's request: a run's config plus the training loop's."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import (
    Field,
    model_validator,
)

from app.engine.data import INFO as DATA_INFO
from app.schemas.run import RunRequest, refuse_field

MAX_TRAIN_STEPS = 20_000
MAX_TRAIN_BATCH = 4096
MAX_LR = 100.0


class TrainRequest(RunRequest):
    """A run's config (data, architecture, init, seed, dtype, strategy) plus SGD's. Training
    takes minibatches of `train_batch` from the data's training part (image data: the
    first n - n // 5 images in the fixed order; random: the first prod(batch) - prod(batch)
    // 5 of the run's own x and target) and validates on the rest. fd_samples, compare and
    reference_heatmaps do not change a training, but they are validated as a run's (a value
    out of its limits, or of the wrong type, is a 422); max_cells sizes the w1 heatmaps of
    the done event."""

    steps: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_STEPS)] = Field(
        500, description=f"Optimizer steps, at most {MAX_TRAIN_STEPS}"
    )
    lr: Annotated[float, Field(strict=True)] = Field(
        0.1, gt=0, le=MAX_LR, allow_inf_nan=False, description="Learning rate"
    )
    momentum: Annotated[float, Field(strict=True)] = Field(
        0.0, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum, as torch.optim.SGD"
    )
    train_batch: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_BATCH)] = Field(
        64, description="Minibatch size; at most the training part's size"
    )
    eval_every: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_STEPS)] = Field(
        25,
        description="Steps between progress events; each also checks that step's manual "
        "gradients against autograd and evaluates the held-out part",
    )

    @model_validator(mode="after")
    def _fits_the_training_part(self) -> TrainRequest:
        if self.data == "random":
            n = math.prod([self.batch] if isinstance(self.batch, int) else self.batch)
            if n < 5:
                refuse_field(
                    "batch",
                    self.batch,
                    "training on random data uses the run's prod(batch) examples, 4/5 to "
                    f"train and 1/5 to validate: batch must give at least 5, got {n}",
                )
        else:
            n = DATA_INFO[self.data].n
        n_train = n - n // 5
        if self.train_batch > n_train:
            refuse_field(
                "train_batch",
                self.train_batch,
                f"the training part has {n_train} examples (data={self.data!r}); "
                f"train_batch={self.train_batch} is larger",
            )
        if self.norm == "batchnorm" and self.hidden and self.train_batch < 2:
            refuse_field(
                "train_batch",
                self.train_batch,
                "norm='batchnorm' takes statistics over the minibatch: train_batch must be "
                "at least 2",
            )
        return self
