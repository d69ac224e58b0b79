"""World <-> voxel geometry and sampling of volumes on world-coordinate grids.

World coordinates are nibabel's RAS+ millimetres, ``affine @ [i, j, k, 1] = [x, y, z, 1]``
(docs/ARCHITECTURE.md). Everything here goes through the full 4x4 affine, so flipped axes,
anisotropic voxels and oblique (rotated or sheared) grids need no special cases.

Crop grid orientation (the contract): a crop has axes ``(D, H, W)`` along world
``(+z, +y, +x)``, and voxel ``(d, h, w)`` sits at
``centre + ((d - D//2) * s_z, (h - H//2) * s_y, (w - W//2) * s_x)`` on (z, y, x), so the voxel
with index ``n//2`` on every axis is exactly at the centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

CROP_ORIENTATION = (
    "axes (D, H, W) run along world (+z, +y, +x) in RAS+ mm: inferior->superior, "
    "posterior->anterior, patient left->right; voxel (d, h, w) is at "
    "centre + ((d - D//2) * spacing_z, (h - H//2) * spacing_y, (w - W//2) * spacing_x) on (z, y, x), "
    "so index n//2 on each axis is exactly the lesion centre"
)


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices ``[..., 3]`` (i, j, k) to world mm ``[..., 3]`` (x, y, z).

    >>> voxel_to_world(np.diag([2.0, -3.0, 4.0, 1.0]), np.array([1.0, 1.0, 1.0])).tolist()
    [2.0, -3.0, 4.0]
    """
    affine = np.asarray(affine, dtype=np.float64)
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map world mm ``[..., 3]`` (x, y, z) to fractional voxel indices ``[..., 3]`` (i, j, k).

    >>> world_to_voxel(np.diag([2.0, -3.0, 4.0, 1.0]), np.array([2.0, -3.0, 4.0])).tolist()
    [1.0, 1.0, 1.0]
    """
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ inverse[:3, :3].T + inverse[:3, 3]


def inside_field_of_view(shape: Sequence[int], affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Whether world points ``[..., 3]`` fall inside a volume's voxels (edges included).

    A point is inside when its voxel coordinate lies in ``[-0.5, n - 0.5]`` on every axis,
    i.e. within the physical extent of the outermost voxels.

    Returns:
        bool array of shape ``xyz.shape[:-1]``.

    >>> inside_field_of_view((4, 4, 4), np.eye(4), np.array([[0.0, 0, 3.4], [0, 0, 3.6]])).tolist()
    [True, False]
    """
    ijk = world_to_voxel(affine, xyz)
    upper = np.asarray(shape[:3], dtype=np.float64) - 0.5
    return np.all((ijk >= -0.5) & (ijk <= upper), axis=-1)


def sample_world(
    volume: np.ndarray,
    affine: np.ndarray,
    points_mm: np.ndarray,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample a volume at world points through its own affine.

    Args:
        volume: ``(I, J, K)`` array in voxel order.
        affine: its ``(4, 4)`` voxel -> RAS+ mm matrix.
        points_mm: world points ``[..., 3]`` as (x, y, z) mm.
        order: 1 = trilinear (images), 0 = nearest voxel (label maps).
        cval: value for points outside the field of view (see :func:`inside_field_of_view`);
            between the outermost voxel centre and the voxel edge the edge voxel's value is used.

    Returns:
        Array of shape ``points_mm.shape[:-1]``: ``float32`` for ``order=1``, the volume's
        dtype for ``order=0``.

    >>> vol = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> sample_world(vol, np.eye(4), np.array([[0.5, 0.5, 0.5], [9.0, 0, 0]]), cval=-1).tolist()
    [3.5, -1.0]
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (trilinear), got {order}")
    volume = np.asarray(volume)
    points_mm = np.asarray(points_mm, dtype=np.float64)
    ijk = world_to_voxel(affine, points_mm).reshape(-1, 3)
    out_dtype = np.float32 if order == 1 else volume.dtype
    # 'nearest' extends edge voxels to their outer half; points beyond that are set to cval
    # below, so the field of view ends exactly at the voxel edges for both orders.
    values = ndimage.map_coordinates(
        volume, ijk.T, order=order, mode="nearest", output=out_dtype, prefilter=False
    )
    outside = ~inside_field_of_view(volume.shape, affine, points_mm).reshape(-1)
    values[outside] = cval
    return values.reshape(points_mm.shape[:-1])


def crop_shape(size_mm: float | Sequence[float], spacing_mm: float | Sequence[float]) -> tuple[int, int, int]:
    """Voxel counts ``(D, H, W)`` of a crop: ``round(size / spacing)`` per axis (z, y, x).

    >>> crop_shape(64, 2)
    (32, 32, 32)
    """
    size = np.broadcast_to(np.asarray(size_mm, dtype=np.float64), (3,))
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if np.any(spacing <= 0) or np.any(size <= 0):
        raise ValueError(f"crop size and spacing must be positive, got {size_mm} and {spacing_mm}")
    counts = np.rint(size / spacing).astype(int)
    if np.any(counts < 1):
        raise ValueError(f"crop of {size_mm} mm at {spacing_mm} mm spacing has no voxels")
    return tuple(int(n) for n in counts)


def crop_grid_mm(
    center_mm: Sequence[float],
    size_mm: float | Sequence[float],
    spacing_mm: float | Sequence[float],
) -> np.ndarray:
    """World coordinates of a crop grid in the contract orientation.

    Args:
        center_mm: crop centre (x, y, z) in RAS+ mm.
        size_mm: edge length in mm, a scalar or per axis in (D, H, W) = (z, y, x) order.
        spacing_mm: voxel spacing in mm, a scalar or per axis in (z, y, x) order.

    Returns:
        float64 array ``(D, H, W, 3)``; ``grid[d, h, w]`` is the (x, y, z) of crop voxel
        ``(d, h, w)``: D runs along +z, H along +y, W along +x, and
        ``grid[D//2, H//2, W//2] == center_mm`` exactly.

    >>> grid = crop_grid_mm((10.0, 20.0, 30.0), 8, 2)
    >>> grid.shape, grid[2, 2, 2].tolist(), grid[3, 2, 0].tolist()
    ((4, 4, 4, 3), [10.0, 20.0, 30.0], [6.0, 20.0, 32.0])
    """
    n_d, n_h, n_w = crop_shape(size_mm, spacing_mm)
    s_z, s_y, s_x = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    c_x, c_y, c_z = (float(v) for v in center_mm)
    z = c_z + (np.arange(n_d) - n_d // 2) * s_z
    y = c_y + (np.arange(n_h) - n_h // 2) * s_y
    x = c_x + (np.arange(n_w) - n_w // 2) * s_x
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1)
