"""Pixel-space mappings of prototype similarity maps (PixPNet spec §1.5): RF boxes, RF heat maps, and the upsampling
baseline of ProtoPNet, for the maps the caller asks for only.

The reference builds P x H x W maps for *all* prototypes of an image in a Python loop over cells (spec §7.2: 1.2 GB
at P = 2000); every function here takes whatever stack of Hz x Wz similarity maps the caller selected (e.g. the 10
prototypes of the image's class, for a batch of images) and works in batched tensor operations.

* `rf_boxes(rf, cells)` — the box form: the RF rectangle (x1, y1, x2, y2), half-open, of flat cell indices
  h * Wz + w (e.g. the argmin cells `min_dist_idxs`, N x P), as the reference's `pixel_space_bboxes`.
* `naive_centres(cells, grid, input_size)` — ProtoPNet's point for the "upsample" mapping: the cell's centre on the
  uniform grid, (round((w + 0.5) W / Wz), round((h + 0.5) H / Hz)) (torch.round: halves to even, as the reference).
* `upsample_maps(sims, input_size)` — bicubic interpolation of Hz x Wz maps to H x W (`pixel_space_upscale`).
* `rf_heat_maps(sims, rf, sigma_factor)` -> `HeatMaps(max, avg, sum)` — the heat-map form: each cell's similarity
  times a Gaussian, written into the cell's RF rectangle, overlaps combined by max / mean / sum.
* `rf_kernel(rf, sigma_factor)` -> (row weights Hz x H, column weights Wz x W): that Gaussian, per cell.

The Gaussian (reference `gaussian_kernel` + `pixel_space_map`): side k = the largest RF side, sigma = k x
sigma_factor, max-normalised to 1 — so it is mild (about 0.88 at the RF's edge midpoints). It is separable, and the
RF is a product of a row and a column interval, so the contribution of cell (h, w) at pixel (y, x) is
s(h, w) * a_h(y) * b_w(x) with a_h zero outside rows(h) and b_w zero outside cols(w). Then
sum = A^T S B (two matrix products), max = max_h a_h(y) max_w s(h, w) b_w(x) (valid because the weights are >= 0),
and the overlap count is (rows covering y) x (columns covering x).

Where each cell's Gaussian is centred, along each axis (L = the largest RF side along that axis):
* ordinary case: on the cell's RF extended to length L on its clipped side — the side towards the border: if the RF
  ends before L (y1 < L) it was clipped at the top/left and the window is [y1 - L, y1), else [y0, y0 + L). For a
  cell clipped by the border the Gaussian is thus cropped, not shrunk, and stays centred on the un-clipped RF.
* "super-100 %" case (spec §1.5): when an RF side reaches the image side and more than one cell has such an RF, the
  clipped RFs no longer tell where a cell's un-clipped RF is. As in the reference, cells are then placed on the
  uniform grid m_h = round((h + 0.5) H / Hz), L grows by twice the largest |(H - 1) / 2 - m_h| over those cells (a
  linear-stretching assumption) and the window is [m_h - L // 2, m_h - L // 2 + L).
Weights: exp(-((y + 1/2 - c)^2 - d^2) / (2 sigma^2)) for the pixel centre y + 1/2, window centre c, and d the offset
of the window's central pixel(s) (1/2 for even L, else 0) so that the maximum is exactly 1, as the reference's.

Deviations from the reference, all where the reference is inconsistent (read, not run):
* non-square RFs (L_rows != L_cols, e.g. a non-square image): the reference crops a k x k kernel by L-based amounts
  and fails with a shape error (spec B12); here each axis uses its own L (sigma is still k x sigma_factor).
* super-100 % case, a cell whose grid window starts inside the image (m - L // 2 > 0) and whose RF does not start
  at 0: the reference's crop arithmetic drops that start (its kernel row 0 lands on pixel 0, not on m - L // 2),
  shifting the Gaussian towards the image centre; here it is centred on the window as intended. For every
  super-100 % layer of spec §1.4's backbones (vgg19_bn maxpool5, resnet18 layer4, resnet50 layer3/layer4 at 224)
  no cell is in that situation and the centres equal the reference's (checked by re-deriving its crop offsets).
* pixels no cell covers: mean 0 (the reference divides by a zero count: NaN). The max map starts from 0 as the
  reference's does (only matters for negative similarities).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from qpm_dist.models.receptive_fields import ReceptiveFields

# Elements of the largest intermediate tensor of the max map (chunks over the stacked maps keep it below this).
MAX_MAP_ELEMENTS = 1 << 24


class HeatMaps(NamedTuple):
    """The three combinations of overlapping cell contributions, each (..., H, W)."""

    max: torch.Tensor
    avg: torch.Tensor
    sum: torch.Tensor


def _check_cells(cells: torch.Tensor, grid: tuple[int, int]) -> None:
    if cells.dtype.is_floating_point or cells.dtype == torch.bool:
        raise ValueError(f"cell indices must be an integer tensor, got {cells.dtype}")
    n = grid[0] * grid[1]
    if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= n):
        raise ValueError(f"cell indices must lie in [0, {n}) for a {grid[0]}x{grid[1]} feature map, got "
                         f"[{int(cells.min())}, {int(cells.max())}]")


def rf_boxes(rf: ReceptiveFields, cells: torch.Tensor) -> torch.Tensor:
    """(..., 4) int64 boxes (x1, y1, x2, y2), half-open pixel coordinates, of the flat cell indices `cells` (...)."""
    _check_cells(cells, rf.grid)
    h, w = cells // rf.grid[1], cells % rf.grid[1]
    rows = torch.tensor(rf.rows, device=cells.device)[h]
    cols = torch.tensor(rf.cols, device=cells.device)[w]
    return torch.stack([cols[..., 0], rows[..., 0], cols[..., 1], rows[..., 1]], dim=-1)


def _grid_midpoints(n_cells: int, size: int) -> torch.Tensor:
    """round((i + 0.5) * size / n_cells) for every cell index i, computed as the reference does (float32, halves
    to even)."""
    return torch.round((torch.arange(n_cells) + 0.5) * size / n_cells).long()


def naive_centres(cells: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """(..., 2) int64 (cx, cy): the uniform-grid centre of each flat cell index (ProtoPNet's "upsample" point)."""
    _check_cells(cells, grid)
    h, w = cells // grid[1], cells % grid[1]
    mid_h = _grid_midpoints(grid[0], input_size[0]).to(cells.device)
    mid_w = _grid_midpoints(grid[1], input_size[1]).to(cells.device)
    return torch.stack([mid_w[w], mid_h[h]], dim=-1)


def _check_maps(sims: torch.Tensor, grid: tuple[int, int]) -> None:
    if sims.ndim < 2 or tuple(sims.shape[-2:]) != tuple(grid):
        raise ValueError(f"similarity maps must end in the feature map's {grid[0]}x{grid[1]}, got shape "
                         f"{tuple(sims.shape)}")
    if not sims.dtype.is_floating_point:
        raise ValueError(f"similarity maps must be floating point, got {sims.dtype}")


def upsample_maps(sims: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """(..., Hz, Wz) -> (..., H, W) by bicubic interpolation (align_corners=False, torch's default and the
    reference's)."""
    if sims.ndim < 2 or not sims.dtype.is_floating_point:
        raise ValueError(f"similarity maps must be floating point (..., Hz, Wz), got {sims.dtype} {tuple(sims.shape)}")
    lead = sims.shape[:-2]
    flat = sims.reshape(1, -1, *sims.shape[-2:])
    return F.interpolate(flat, size=tuple(input_size), mode="bicubic").reshape(*lead, *input_size)


class _AxisWindows(NamedTuple):
    """Along one axis: each cell's Gaussian window start (n,), the window length L."""

    start: torch.Tensor
    length: int


def _kernel_windows(rf: ReceptiveFields) -> tuple[_AxisWindows, _AxisWindows]:
    """Where each cell's Gaussian sits, per axis (the module docstring's two cases)."""
    (height, width), (hz, wz) = rf.input_size, rf.grid
    rows, cols = torch.tensor(rf.rows), torch.tensor(rf.cols)
    heights, widths = rows[:, 1] - rows[:, 0], cols[:, 1] - cols[:, 0]
    rf_h, rf_w = int(heights.max()), int(widths.max())
    big = (heights[:, None] >= height) | (widths[None, :] >= width)
    if (rf_h >= height or rf_w >= width) and int(big.sum()) > 1:
        big_h, big_w = big.nonzero(as_tuple=True)
        mid_h, mid_w = _grid_midpoints(hz, height), _grid_midpoints(wz, width)
        pad_h = int(torch.round(((height - 1) / 2 - mid_h[big_h].double()).abs().max()))
        pad_w = int(torch.round(((width - 1) / 2 - mid_w[big_w].double()).abs().max()))
        len_h, len_w = rf_h + 2 * pad_h, rf_w + 2 * pad_w
        return _AxisWindows(mid_h - len_h // 2, len_h), _AxisWindows(mid_w - len_w // 2, len_w)

    def extended(iv: torch.Tensor, length: int) -> _AxisWindows:
        return _AxisWindows(torch.where(iv[:, 1] < length, iv[:, 1] - length, iv[:, 0]), length)

    return extended(rows, rf_h), extended(cols, rf_w)


def _axis_weights(iv: torch.Tensor, window: _AxisWindows, size: int, sigma: float) -> torch.Tensor:
    """(n, size) float64: the max-normalised Gaussian of each cell's window, zero outside the cell's RF interval."""
    pixel = torch.arange(size, dtype=torch.float64)
    centre = window.start.double() + window.length / 2
    offset = 0.5 if window.length % 2 == 0 else 0.0
    weights = torch.exp(-0.5 * ((pixel[None, :] + 0.5 - centre[:, None]) ** 2 - offset**2) / sigma**2)
    return weights * _coverage(iv, size)


def _coverage(iv: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) bool: pixel index inside interval [lo, hi) of each cell."""
    index = torch.arange(size)
    return (index[None, :] >= iv[:, :1]) & (index[None, :] < iv[:, 1:])


def rf_kernel(rf: ReceptiveFields, sigma_factor: float = 1.0, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-cell Gaussian as row weights (Hz x H) and column weights (Wz x W): cell (h, w) puts
    rows[h, y] * cols[w, x] at pixel (y, x), zero outside its RF rectangle."""
    if not sigma_factor > 0:
        raise ValueError(f"sigma_factor must be > 0, got {sigma_factor}")
    win_rows, win_cols = _kernel_windows(rf)
    sigma = max(win_rows.length, win_cols.length) * float(sigma_factor)
    (height, width) = rf.input_size
    row_w = _axis_weights(torch.tensor(rf.rows), win_rows, height, sigma)
    col_w = _axis_weights(torch.tensor(rf.cols), win_cols, width, sigma)
    return row_w.to(dtype=dtype, device=device), col_w.to(dtype=dtype, device=device)


def rf_heat_maps(sims: torch.Tensor, rf: ReceptiveFields, sigma_factor: float = 1.0) -> HeatMaps:
    """(..., Hz, Wz) similarity maps -> `HeatMaps` (max, avg, sum), each (..., H, W) (spec §1.5, "ours").
    Pass only the maps you need (e.g. the true class's prototypes): the cost is linear in their number."""
    _check_maps(sims, rf.grid)
    (hz, wz), (height, width) = rf.grid, rf.input_size
    lead = sims.shape[:-2]
    flat = sims.reshape(-1, hz, wz)
    row_w, col_w = rf_kernel(rf, sigma_factor, sims.dtype, sims.device)
    total = row_w.T @ (flat @ col_w)  # (n, H, W): sum over h, w of s * a_h(y) * b_w(x)
    rows_covering = _coverage(torch.tensor(rf.rows), height).sum(0)
    cols_covering = _coverage(torch.tensor(rf.cols), width).sum(0)
    count = (rows_covering[:, None] * cols_covering[None, :]).to(device=sims.device, dtype=sims.dtype)
    avg = torch.where(count > 0, total / count.clamp_min(1), torch.zeros((), dtype=sims.dtype, device=sims.device))
    chunk = max(1, MAX_MAP_ELEMENTS // (hz * max(wz * width, height * width)))
    peaks = []
    for part in flat.split(chunk):
        best_w = (part[:, :, :, None] * col_w[None, None]).amax(dim=2)  # (c, Hz, W): max over w of s * b_w(x)
        peaks.append((row_w[None, :, :, None] * best_w[:, :, None, :]).amax(dim=1).clamp_min(0))  # (c, H, W)
    peak = torch.cat(peaks) if peaks else total.new_zeros(total.shape)
    shape = (*lead, height, width)
    return HeatMaps(peak.reshape(shape), avg.reshape(shape), total.reshape(shape))
