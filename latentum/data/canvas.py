"""Image layout on the model's square canvas: content sits top-left, the rest is pure black.

An image of N x N cells may fill only the top-left N x N patches of the 8 x 8 patch canvas, so the backbone
reads and generates just those N * N "active" tokens (like variable-resolution models, a small image costs
few tokens). Full-bleed images use every patch. The active grid is read from the pixels.
"""

from __future__ import annotations

from functools import cache

import numpy as np


def active_grid(image: np.ndarray, grid: int = 8) -> int:
    """Smallest g such that every pixel outside the top-left g x g cells (of a grid x grid canvas) is black."""
    cell = image.shape[0] // grid
    lit = image.reshape(image.shape[0], image.shape[1], -1).any(-1)  # (H, W)
    rows, cols = np.nonzero(lit.any(1))[0], np.nonzero(lit.any(0))[0]
    if rows.size == 0:
        return grid
    extent = max(int(rows[-1]), int(cols[-1])) + 1
    return max(1, min(grid, -(-extent // cell)))


@cache
def active_index(g: int, grid: int = 8) -> tuple[int, ...]:
    """Raster indices, among the grid * grid canvas tokens, of the top-left g x g active tokens."""
    if not 1 <= g <= grid:
        raise ValueError(f"active grid must be in 1..{grid}, got {g}")
    return tuple(r * grid + c for r in range(g) for c in range(g))


@cache
def rope_offsets(g: int) -> tuple[tuple[int, int], ...]:
    """For each active token k = r * g + c of a g x g image: (r - k, c - k). Added to the token's 1-D position
    p + k (p: the image's first token) it gives the 2-D RoPE position (p + r, p + c) of
    ``BackboneConfig.image_rope = "2d"``; text tokens take offset (0, 0)."""
    if g < 1:
        raise ValueError(f"active grid must be >= 1, got {g}")
    return tuple((r - (r * g + c), c - (r * g + c)) for r in range(g) for c in range(g))


def named_cells(ids: list[int], tok, grid: int = 8) -> list[int]:
    """Per token of ``ids``: the canvas cell (r * grid + c, 0-indexed) that a written "row R column C"
    (1-indexed) names, from the token of C to the end of the text (a later "row R column C" takes over); -1
    before. The token after C (e.g. "?" in "What is at row 2 column 3 ?") predicts the answer, so it holds the
    cell itself and finds it in the image in one attention step. Coordinates outside the canvas name nothing."""
    words = [tok.id_to_token(i) for i in ids]
    cells, cell = [], -1
    for k in range(len(words)):
        row, r, col, c = words[k - 3:k + 1] if k >= 3 else ("", "", "", "")
        if (row, col) == ("row", "column") and f"{r}{c}".isdigit() and max(int(r), int(c)) <= grid \
                and min(int(r), int(c)) >= 1:
            cell = (int(r) - 1) * grid + int(c) - 1
        cells.append(cell)
    return cells
