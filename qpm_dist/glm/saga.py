"""`solver=glm_saga`: the reference solver, glm-saga 0.1.2, through its published API (MIT licence).

Runs in one process (rank 0) over all training rows, as glm-saga has no distributed mode. Each λ of our
path is one call of `glm_saga.elasticnet.glm_saga` with a one-point grid (k=1; λ_max given through its
`metadata` argument), warm-started from the previous call's weights and SAGA state, so our code decides
where the path stops while glm-saga does every SAGA step with its own stopping rule (lookbehind, tol).

Differences from the reference's use of it (specs/qsenn_sldd.md §4–5, bugs 6 and 11): n_ex is the number
of rows actually fitted (the reference passed N while iterating over 0.9·N rows); no 10 % validation split
is held out (it never influenced a decision); the bias starts at its optimum softmax(b) = ȳ, which is what
λ_max assumes. The loader yields whole index batches of tensors (no per-sample collate); this only makes
glm-saga faster, so the benchmark's time ratio is conservative.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from qpm_dist.glm.problem import column_scores, penalty


@dataclass
class SagaOptions:
    batch_size: int = 256
    lr: float = 0.1
    max_epochs: int = 2000  # per λ
    tol: float = 1e-4
    lookbehind: int = 5
    seed: int = 0


class _IndexBatches(Sampler):
    """Random batches of row indices as tensors (one epoch = one permutation)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).split(self.batch_size))


class SagaGLM:
    """Same interface as FastGLM (solve / W / b / accuracy), single process."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, bias: torch.Tensor,
                 options: SagaOptions | None = None, test: tuple[torch.Tensor, torch.Tensor] | None = None,
                 log_path: Path | None = None) -> None:
        from glm_saga.elasticnet import IndexedTensorDataset

        self.opt = options or SagaOptions()
        self.X, self.y = X.float().contiguous(), y.long()
        self.C, self.D = num_classes, X.shape[1]
        self.test = test
        self.linear = nn.Linear(self.D, self.C).to(X.device)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(bias.float())
        dataset = IndexedTensorDataset(self.X, self.y)
        self.loader = DataLoader(dataset, sampler=_IndexBatches(len(dataset), self.opt.batch_size, self.opt.seed),
                                 batch_size=None)
        self.state = None
        self.log_path = log_path
        self.stats = {"epochs_logged": 0}

    @property
    def W(self) -> torch.Tensor:
        return self.linear.weight.detach()

    @property
    def b(self) -> torch.Tensor:
        return self.linear.bias.detach()

    def solve(self, lam: float, alpha: float, group: bool) -> dict:
        from glm_saga.elasticnet import glm_saga

        opt = self.opt
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glm-saga's implicit-dim softmax warning
            out = glm_saga(self.linear, self.loader, opt.lr, opt.max_epochs, alpha, group=group, state=self.state,
                           n_ex=self.X.shape[0], n_classes=self.C, tol=opt.tol, epsilon=1.0, k=1, do_zero=False,
                           lookbehind=opt.lookbehind,
                           metadata={"max_reg": {"group": lam * max(alpha, 1e-3), "nongrouped": lam * max(alpha, 1e-3)}})
        self.state = out["state"]
        text = captured.getvalue()
        if self.log_path is not None:
            with open(self.log_path, "a") as fh:
                fh.write(f"# lambda {lam:.6g} alpha {alpha} group {group}\n{text}")
        stopped = [line for line in text.splitlines() if "early stop at" in line]
        epochs = int(stopped[-1].rsplit("early stop at", 1)[1].strip(" ]")) + 1 if stopped else opt.max_epochs
        return {"epochs": epochs, "converged": bool(stopped)}

    def selection_scores(self, columns: list[int], ridge: float) -> torch.Tensor:
        """FastGLM.selection_scores with glm-saga doing the fit: a linear layer on `columns` alone, ridge
        penalty (α = 0), warm-started from the previous step's fit; the gradient over all rows in memory."""
        cols = torch.tensor(columns, dtype=torch.long, device=self.X.device)
        if cols.numel():
            fit = SagaGLM(self.X.index_select(1, cols), self.y, self.C, self.b, self.opt, log_path=self.log_path)
            with torch.no_grad():
                fit.linear.weight.copy_(self.W.index_select(1, cols))
            fit.solve(ridge, 0.0, group=False)
            with torch.no_grad():
                self.linear.weight.zero_()
                self.linear.weight.index_copy_(1, cols, fit.W)
                self.linear.bias.copy_(fit.b)
        with torch.no_grad():
            A = torch.softmax(self.linear(self.X), dim=1)
            A[torch.arange(A.shape[0], device=A.device), self.y] -= 1
            return column_scores((A.T @ self.X) / self.X.shape[0], group=True)

    def objective(self, lam: float, alpha: float, group: bool) -> float:
        with torch.no_grad():
            Z = self.linear(self.X)
            loss = float(nn.functional.cross_entropy(Z, self.y, reduction="sum").double()) / self.X.shape[0]
        return loss + penalty(self.W, lam, alpha, group)

    @torch.no_grad()
    def accuracy(self, W: torch.Tensor | None = None, b: torch.Tensor | None = None,
                 columns: torch.Tensor | None = None) -> dict:
        W = self.W if W is None else W
        b = self.b if b is None else b
        out = {}
        for name, X, y in [("train", self.X, self.y)] + ([("test", *self.test)] if self.test is not None else []):
            Xs = X if columns is None else X.index_select(1, columns)
            out[f"{name}_acc"] = 100.0 * float((torch.addmm(b, Xs.float(), W.T).argmax(1) == y).double().mean()) \
                if X.shape[0] else 0.0
        return out
