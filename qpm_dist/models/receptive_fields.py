"""Exact receptive fields of every feature-map cell, with border clipping (PixPNet spec §1.4).

PixPNet maps a prototype match back to pixels through the receptive field (RF) of the matching latent cell: the set
of input pixels the cell's value depends on, padding excluded. The reference builds a numpy "symbolic twin" of each
architecture whose elements are sets of rectangles (seconds per model, a pickle cache with a file lock, spec §7.2).

Here the same sets are computed per axis. In a CNN every operation acts on rows and columns separately (a k x k
window is a product of a row window and a column window), and a union of products over a product of index sets is
the product of the unions: RF(h, w) = rows(h) x cols(w). So it suffices to propagate, for every node of the graph,
one interval [lo, hi) per output row and one per output column — O(layers x (H + W) x kernel) integer work,
milliseconds for a ResNet-50 at 448 px (see tests/test_receptive_fields.py and the report of branch i16-rf).

Rules (the reference's, spec §1.4): convolution / max-pool / avg-pool -> the union of the input window's intervals,
the window clipped to the input (padding contributes nothing); adaptive pooling -> floor/ceil windows; normalisation,
activations, dropout -> identity; residual addition / concatenation / any element-wise binary op -> the union of the
operands' rectangles. Normalisation statistics count as constants: BatchNorm in eval mode is exactly pointwise; the
per-sample statistics of GroupNorm (model.norm=group) depend on the whole map, as train-mode BatchNorm's batch
statistics do, and the conventional RF — the reference's too — ignores them.

Refused, with one line naming the node (spec §7.2: "unsupported ops must be rejected"): dilation != 1, padding modes
other than zeros (reflect/circular padding reads pixels outside the window), a window that lies wholly in the
padding (an empty RF), a union with a gap along an axis (e.g. a stride-2 1x1 conv followed by a 2-wide window:
the reference silently merges such rectangles into their span, spec B14), a union of two rectangles that is not a
rectangle, and any operation not listed above (flatten, linear, attention ...).

The graph is walked with torch.fx (torchvision's ResNets, VGGs and our backbones all trace), so residual blocks with
their strided 1x1 downsample branch need no special code.

API:
* `ReceptiveFields` — rows (Hz x 2), cols (Wz x 2); `bounds` Hz x Wz x 4 (y0, y1, x0, x1, half-open), `sizes`
  Hz x Wz x 2 (height, width), `area_percent`, `summary()`;
* `receptive_fields(module, height, width)` — any traceable module mapping images to one feature map;
* `backbone_receptive_fields(arch, layer, reduced_strides, height, width)` — the truncated backbone's, cached per
  (arch, layer, reduced_strides, height, width) in memory (model width/norm/weights do not change RFs).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from qpm_dist.models.truncation import check_layer, truncated_backbone

# Input sizes beyond this are refused (the work is linear in H + W, but a typo like 224000 should not allocate).
MAX_SIDE = 16384


class UnsupportedForReceptiveField(ValueError):
    """The network contains an operation whose receptive field is not a rectangle computed by the rules above."""


@dataclass(frozen=True)
class ReceptiveFields:
    """The RF of every cell of an Hz x Wz feature map computed from an H x W input: rows(h) x cols(w).

    `rows[h] = (y0, y1)` and `cols[w] = (x0, x1)` are half-open pixel intervals, already clipped to the image.
    The arrays are read-only (instances are cached and shared)."""

    input_size: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def bounds(self) -> np.ndarray:
        """Hz x Wz x 4 int64: (y0, y1, x0, x1) of every cell, half-open (the reference's `rf_idxs`)."""
        hz, wz = self.grid
        return np.concatenate([np.broadcast_to(self.rows[:, None], (hz, wz, 2)),
                               np.broadcast_to(self.cols[None, :], (hz, wz, 2))], axis=2)

    @property
    def sizes(self) -> np.ndarray:
        """Hz x Wz x 2 int64: (height, width) of every cell's RF (the reference's `rf_sizes`)."""
        heights, widths = self.rows[:, 1] - self.rows[:, 0], self.cols[:, 1] - self.cols[:, 0]
        hz, wz = self.grid
        return np.stack([np.broadcast_to(heights[:, None], (hz, wz)), np.broadcast_to(widths[None, :], (hz, wz))], 2)

    @property
    def area_percent(self) -> np.ndarray:
        """Hz x Wz: each cell's RF area as a percentage of the image area."""
        sizes = self.sizes
        return 100.0 * sizes[..., 0] * sizes[..., 1] / (self.input_size[0] * self.input_size[1])

    def summary(self) -> dict[str, Any]:
        """The figures of spec §1.4's table: grid, mean/min/max RF area %, centre cell (Hz//2, Wz//2) and corner
        cell (0, 0) RF (height, width)."""
        area, sizes = self.area_percent, self.sizes
        hz, wz = self.grid
        return {"grid": (hz, wz), "mean_pct": float(area.mean()), "min_pct": float(area.min()),
                "max_pct": float(area.max()), "centre": tuple(int(v) for v in sizes[hz // 2, wz // 2]),
                "corner": tuple(int(v) for v in sizes[0, 0])}


# ---------------------------------------------------------------------------------------------- per-axis rules


def _read_only(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    a.setflags(write=False)
    return a


def _window_union(iv: np.ndarray, starts: np.ndarray, ends: np.ndarray, where: str) -> np.ndarray:
    """For every output index o: the union of the input intervals iv[starts[o] : ends[o]], the window clipped to
    [0, len(iv)) (the indices outside are padding). Refuses an all-padding window and a union with a gap."""
    n = len(iv)
    lo_idx, hi_idx = np.maximum(starts, 0), np.minimum(ends, n)
    empty = np.flatnonzero(lo_idx >= hi_idx)
    if len(empty):
        o = int(empty[0])
        raise UnsupportedForReceptiveField(
            f"{where}: output index {o} reads only padding (window [{int(starts[o])}, {int(ends[o])}) of an input of "
            f"size {n}); its receptive field would be empty")
    width = int((hi_idx - lo_idx).max())
    # Indices past a window's end repeat its last index: duplicates change no union.
    idx = np.minimum(lo_idx[:, None] + np.arange(width)[None, :], hi_idx[:, None] - 1)
    lo, hi = iv[idx, 0], iv[idx, 1]
    order = np.argsort(lo, axis=1, kind="stable")
    lo, hi = np.take_along_axis(lo, order, 1), np.take_along_axis(hi, order, 1)
    reach = np.maximum.accumulate(hi, axis=1)
    gaps = np.argwhere(lo[:, 1:] > reach[:, :-1])
    if len(gaps):
        o, j = (int(v) for v in gaps[0])
        raise UnsupportedForReceptiveField(
            f"{where}: the receptive field of output index {o} has a gap (pixels [{int(reach[o, j])}, "
            f"{int(lo[o, j + 1])}) are not seen between two seen ranges): not a rectangle (spec B14)")
    return np.stack([lo[:, 0], reach[:, -1]], axis=1)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _sliding_axis(iv: np.ndarray, kernel: int, stride: int, pad: int, ceil_mode: bool, where: str,
                  pad_end: int | None = None) -> np.ndarray:
    """Output intervals of a sliding window (conv / pool) along one axis: torch's output length, window
    [o * stride - pad, o * stride - pad + kernel)."""
    n = len(iv)
    pad_end = pad if pad_end is None else pad_end
    span = n + pad + pad_end - kernel
    if span < 0:
        raise UnsupportedForReceptiveField(f"{where}: kernel {kernel} is larger than the padded input ({n} + padding)")
    n_out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (n_out - 1) * stride >= n + pad:
        n_out -= 1  # torch: the last window must start inside the input or the left padding
    starts = np.arange(n_out) * stride - pad
    return _window_union(iv, starts, starts + kernel, where)


def _adaptive_axis(iv: np.ndarray, n_out: int | None, where: str) -> np.ndarray:
    """Adaptive pooling windows: [floor(o * n / m), ceil((o + 1) * n / m))."""
    n = len(iv)
    m = n if n_out is None else n_out
    o = np.arange(m)
    return _window_union(iv, (o * n) // m, -((-(o + 1) * n) // m), where)


@dataclass(frozen=True)
class _Axes:
    rows: np.ndarray
    cols: np.ndarray


def _conv(mod: nn.Conv2d, x: _Axes, where: str) -> _Axes:
    if any(d != 1 for d in _pair(mod.dilation)):
        raise UnsupportedForReceptiveField(f"{where}: dilation {tuple(_pair(mod.dilation))} is not supported "
                                           f"(a dilated window has gaps); expected dilation 1")
    if mod.padding_mode != "zeros":
        raise UnsupportedForReceptiveField(f"{where}: padding_mode={mod.padding_mode!r} reads pixels outside the "
                                           f"window; expected 'zeros'")
    kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
    if mod.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif mod.padding == "same":  # torch pads (k - 1) in total, the smaller half first
        pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    else:
        pads = [(p, p) for p in _pair(mod.padding)]
    return _Axes(_sliding_axis(x.rows, kernel[0], stride[0], pads[0][0], False, where, pads[0][1]),
                 _sliding_axis(x.cols, kernel[1], stride[1], pads[1][0], False, where, pads[1][1]))


def _pool(mod: nn.MaxPool2d | nn.AvgPool2d, x: _Axes, where: str) -> _Axes:
    if any(d != 1 for d in _pair(getattr(mod, "dilation", 1))):
        raise UnsupportedForReceptiveField(f"{where}: dilation {mod.dilation} is not supported; expected dilation 1")
    kernel = _pair(mod.kernel_size)
    stride = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    pad = _pair(mod.padding)
    return _Axes(_sliding_axis(x.rows, kernel[0], stride[0], pad[0], mod.ceil_mode, where),
                 _sliding_axis(x.cols, kernel[1], stride[1], pad[1], mod.ceil_mode, where))


def _adaptive(mod: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d, x: _Axes, where: str) -> _Axes:
    size = mod.output_size
    rows_out, cols_out = (size, size) if isinstance(size, int) or size is None else size
    return _Axes(_adaptive_axis(x.rows, rows_out, where), _adaptive_axis(x.cols, cols_out, where))


def _union(a: _Axes, b: _Axes, where: str) -> _Axes:
    """Cell-wise union of two rectangles rows_a(h) x cols_a(w) and rows_b(h) x cols_b(w) (a residual addition).
    It is a rectangle iff one contains the other, or they agree on one axis and overlap or touch on the other; it
    then equals the bounding box, which keeps the product form. A 1-long axis broadcasts (e.g. an SE block's
    N x C x 1 x 1 gate)."""
    try:
        rows, cols = np.broadcast_arrays(a.rows, b.rows), np.broadcast_arrays(a.cols, b.cols)
    except ValueError:
        raise UnsupportedForReceptiveField(f"{where}: operands of spatial shapes {len(a.rows)}x{len(a.cols)} and "
                                           f"{len(b.rows)}x{len(b.cols)} do not broadcast") from None

    def relations(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
        u_in_v = (u[:, 0] >= v[:, 0]) & (u[:, 1] <= v[:, 1])
        v_in_u = (v[:, 0] >= u[:, 0]) & (v[:, 1] <= u[:, 1])
        touch = np.maximum(u[:, 0], v[:, 0]) <= np.minimum(u[:, 1], v[:, 1])
        return u_in_v, v_in_u, u_in_v & v_in_u, touch

    r_ab, r_ba, r_eq, r_touch = (m[:, None] for m in relations(*rows))
    c_ab, c_ba, c_eq, c_touch = (m[None, :] for m in relations(*cols))
    ok = (r_ab & c_ab) | (r_ba & c_ba) | (r_eq & c_touch) | (r_touch & c_eq)
    if not ok.all():
        h, w = (int(v) for v in np.argwhere(~ok)[0])
        ra, rb, ca, cb = rows[0][h], rows[1][h], cols[0][w], cols[1][w]
        raise UnsupportedForReceptiveField(
            f"{where}: the union of the operands' receptive fields of cell ({h}, {w}) is not a rectangle: rows "
            f"{tuple(int(v) for v in ra)} x cols {tuple(int(v) for v in ca)} and rows {tuple(int(v) for v in rb)} x "
            f"cols {tuple(int(v) for v in cb)}")

    def hull(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.stack([np.minimum(u[:, 0], v[:, 0]), np.maximum(u[:, 1], v[:, 1])], axis=1)

    return _Axes(hull(*rows), hull(*cols))


# ------------------------------------------------------------------------------------------- the graph walk

_IDENTITY_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU,
                     nn.ELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                     nn.Identity, nn.Dropout, nn.Dropout2d)
_IDENTITY_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, torch.sigmoid, torch.tanh,
                       F.dropout, operator.neg, operator.pos}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                     operator.truediv, torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum}
_IDENTITY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "contiguous", "clone", "float", "to"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}


def _module_rule(mod: nn.Module, x: _Axes, where: str) -> _Axes:
    if isinstance(mod, nn.Conv2d):
        return _conv(mod, x, where)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(mod, x, where)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(mod, x, where)
    if isinstance(mod, _IDENTITY_MODULES):
        return x
    raise UnsupportedForReceptiveField(f"{where}: {type(mod).__name__} has no receptive-field rule; supported: "
                                       f"Conv2d, MaxPool2d, AvgPool2d, adaptive pooling, normalisation, activations")


def _elementwise(operands: list[Any], where: str) -> _Axes:
    maps = [v for v in operands if isinstance(v, _Axes)]
    if not maps:
        raise UnsupportedForReceptiveField(f"{where}: no feature-map operand")
    out = maps[0]
    for other in maps[1:]:
        out = _union(out, other, where)
    return out


def _walk(graph_module: fx.GraphModule, height: int, width: int) -> _Axes:
    """Propagate per-axis intervals through the traced graph, node by node (fx nodes are in execution order)."""
    pixels_h, pixels_w = np.arange(height), np.arange(width)
    values: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: values[n])

    placeholders = 0
    for node in graph_module.graph.nodes:
        where = f"node {node.name!r} ({node.op} {node.target})"
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise UnsupportedForReceptiveField(f"{where}: the module takes more than one input")
            values[node] = _Axes(np.stack([pixels_h, pixels_h + 1], 1), np.stack([pixels_w, pixels_w + 1], 1))
        elif node.op == "call_module":
            (x,) = arg(node.args)
            values[node] = _module_rule(graph_module.get_submodule(node.target), x, where)
        elif node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS:
            values[node] = arg(node.args)[0]
        elif node.op == "call_function" and node.target in _BINARY_FUNCTIONS:
            values[node] = _elementwise(list(arg(node.args)), where)
        elif node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim != 1:
                raise UnsupportedForReceptiveField(f"{where}: concatenation along dim {dim}; expected channels (1)")
            values[node] = _elementwise(list(arg(node.args[0])), where)
        elif node.op == "call_method" and node.target in _IDENTITY_METHODS:
            values[node] = arg(node.args)[0]
        elif node.op == "call_method" and node.target in _BINARY_METHODS:
            values[node] = _elementwise(list(arg(node.args)), where)
        elif node.op == "output":
            out = arg(node.args[0])
            if not isinstance(out, _Axes):
                raise UnsupportedForReceptiveField(f"{where}: the module must return one feature map")
            return out
        else:
            raise UnsupportedForReceptiveField(f"{where}: no receptive-field rule for this operation")
    raise UnsupportedForReceptiveField("the traced graph has no output")


def _check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE:
            raise ValueError(f"receptive fields: input {name} {v!r} is not an integer in [1, {MAX_SIDE}]")


def receptive_fields(module: nn.Module, height: int, width: int) -> ReceptiveFields:
    """The RF of every output cell of `module` (images N x C x height x width -> one N x C' x Hz x Wz map).
    The module is only traced, never run: build it on the meta device to skip allocating weights."""
    _check_size(height, width)
    try:
        graph_module = fx.symbolic_trace(module)
    except Exception as e:  # tracing failures are the module's (data-dependent control flow), report them as such
        raise UnsupportedForReceptiveField(f"{type(module).__name__} cannot be traced by torch.fx: {e}") from e
    out = _walk(graph_module, int(height), int(width))
    return ReceptiveFields((int(height), int(width)), _read_only(out.rows), _read_only(out.cols))


@lru_cache(maxsize=64)
def backbone_receptive_fields(arch: str, layer: str, reduced_strides: bool, height: int, width: int
                              ) -> ReceptiveFields:
    """RFs of `truncation.truncated_backbone(arch, layer, reduced_strides)` at height x width, computed once per
    process per key (milliseconds; the reference needed seconds and a pickle cache with a file lock, spec §7.2)."""
    check_layer(arch, layer)
    _check_size(height, width)
    with torch.device("meta"):
        module = truncated_backbone(arch, layer, reduced_strides)
    return receptive_fields(module, height, width)
