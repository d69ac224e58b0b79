"""World-coordinate geometry: known world points must land at known crop voxels.

Each volume holds a bright sphere at a known world point C and a smaller marker at
C + (+20 mm x, 0, -10 mm z). A 64 mm crop at 2 mm centred on C must show the sphere's intensity
centroid at the centre voxel (16, 16, 16) and the marker at (d, h, w) = (16 - 5, 16, 16 + 10),
in both channels, whatever the affines: this pins the axis order and every sign.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from psma_lib.crop import CT_PAD_HU, PET_PAD_SUV, CropSet, crop_volumes, measure_lesion
from psma_lib.geometry import (
    crop_grid_mm,
    crop_shape,
    inside_field_of_view,
    sample_world,
    voxel_to_world,
    world_to_voxel,
)
from psma_lib.images import image_bounds_mm

CENTRE_MM = np.array([12.3, -45.6, 78.9])
MARKER_OFFSET_MM = np.array([20.0, 0.0, -10.0])  # (x, y, z)
SIZE_MM, SPACING_MM = 64.0, 2.0
N = 32
# Crop voxel (d, h, w) of the marker: d along +z, h along +y, w along +x.
MARKER_VOXEL = (N // 2 - 5, N // 2, N // 2 + 10)


def rotation(axis, degrees) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis`` by ``degrees``."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def affine_around(matrix, shape, world_centre, shift_voxels=(0.37, -0.21, 0.13)) -> np.ndarray:
    """Affine with linear part ``matrix`` placing ``world_centre`` near the volume's middle,
    off the voxel grid by ``shift_voxels`` so nothing coincides by luck."""
    affine = np.eye(4)
    affine[:3, :3] = matrix
    middle = (np.asarray(shape) - 1) / 2 + np.asarray(shift_voxels)
    affine[:3, 3] = np.asarray(world_centre) - np.asarray(matrix) @ middle
    return affine


def soft_sphere(shape, affine, centre_mm, radius_mm, value, edge_mm=1.5) -> np.ndarray:
    """Volume whose voxel centres hold ``value`` inside a sphere (world mm), smooth edge."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    distance = np.linalg.norm(voxel_to_world(affine, ijk) - centre_mm, axis=-1)
    return (value / (1 + np.exp((distance - radius_mm) / edge_mm))).astype(np.float32)


def phantom(shape, affine, value) -> np.ndarray:
    """Sphere (r 7 mm) at CENTRE_MM plus a marker (r 4 mm) at CENTRE_MM + MARKER_OFFSET_MM."""
    return soft_sphere(shape, affine, CENTRE_MM, 7.0, value) + soft_sphere(
        shape, affine, CENTRE_MM + MARKER_OFFSET_MM, 4.0, value)


def blob_centroids(channel: np.ndarray, background: float) -> list[np.ndarray]:
    """Intensity centroids (d, h, w) of the bright blobs of a crop channel, largest first."""
    signal = channel - background
    labels, count = ndimage.label(signal > 0.2 * signal.max())
    sizes = ndimage.sum(np.ones_like(signal), labels, index=range(1, count + 1))
    order = np.argsort(sizes)[::-1] + 1
    return [np.array(ndimage.center_of_mass(signal, labels, int(k))) for k in order]


PET_SHAPE = (36, 34, 40)
CT_SHAPE = (90, 100, 50)
OBLIQUE = rotation((1.0, 2.0, 3.0), 33.0) @ np.array([[1.0, 0.15, 0], [0, 1, 0], [0, 0, 1]]) @ np.diag(
    [3.0, 3.5, 4.0])
CASES = {
    "axis-aligned anisotropic": (np.diag([4.0, 4.0, 3.0]), np.diag([4.0, 4.0, 3.0])),
    "flipped (LPS-like)": (np.diag([-4.0, -4.0, 3.0]), np.diag([-4.0, -4.0, -3.0])),
    "oblique": (OBLIQUE, OBLIQUE),
    # CT finer in-plane, flipped, its own shape and shifted origin; PET axis-aligned.
    "PET and CT on different grids": (np.diag([4.0, 4.0, 3.0]), np.diag([-1.2, -1.0, 2.0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sphere_and_marker_land_at_the_right_crop_voxels(case):
    pet_matrix, ct_matrix = CASES[case]
    pet_affine = affine_around(pet_matrix, PET_SHAPE, CENTRE_MM)
    if case == "PET and CT on different grids":
        ct_shape = CT_SHAPE
        ct_affine = affine_around(ct_matrix, ct_shape, CENTRE_MM + [3.0, -4.0, 5.0], (0.0, 0.5, 0.25))
    else:
        ct_shape = PET_SHAPE
        ct_affine = affine_around(ct_matrix, ct_shape, CENTRE_MM, (-0.3, 0.4, 0.1))
    pet = phantom(PET_SHAPE, pet_affine, 10.0)
    ct = phantom(ct_shape, ct_affine, 800.0)
    # The label map on the CT's grid: the sphere is lesion 5, the marker another lesion (6).
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in ct_shape], indexing="ij"), axis=-1)
    world = voxel_to_world(ct_affine, ijk)
    mask = np.zeros(ct_shape, np.int16)
    mask[np.linalg.norm(world - CENTRE_MM, axis=-1) <= 7.0] = 5
    mask[np.linalg.norm(world - CENTRE_MM - MARKER_OFFSET_MM, axis=-1) <= 4.0] = 6

    crops, edge = crop_volumes(pet, pet_affine, ct, ct_affine, CENTRE_MM[None], SIZE_MM, SPACING_MM,
                               mask=mask, mask_affine=ct_affine, labels=[5])

    assert crops.shape == (1, 3, N, N, N) and crops.dtype == np.float32
    assert not edge[0], "the crop lies inside both fields of view"
    for channel, name in ((0, "PET"), (1, "CT")):
        sphere, marker = blob_centroids(crops[0, channel], background=0.0)
        assert np.allclose(sphere, (N // 2,) * 3, atol=0.3), f"{name} sphere at {sphere}"
        assert np.allclose(marker, MARKER_VOXEL, atol=0.3), f"{name} marker at {marker}"
    # The mask channel holds this lesion (label 5) only, where the world says it is: its centroid
    # within half a mask voxel of the crop centre, its volume that of a 7 mm ball, the marker's
    # voxels (label 6) empty.
    lesion = crops[0, 2]
    assert set(np.unique(lesion)) == {0.0, 1.0} and lesion[MARKER_VOXEL] == 0
    mask_voxel = np.linalg.norm(ct_affine[:3, :3], axis=0)
    centroid = np.array(ndimage.center_of_mass(lesion))
    assert np.all(np.abs(centroid - N // 2) * SPACING_MM <= mask_voxel.max() / 2), centroid
    assert lesion.sum() * SPACING_MM**3 == pytest.approx(4 / 3 * np.pi * 7.0**3, rel=0.25)


@pytest.mark.parametrize("case", ["axis-aligned anisotropic", "flipped (LPS-like)", "oblique"])
def test_mask_centroid_and_suvmax_are_world_positions(case):
    pet_matrix, _ = CASES[case]
    pet_affine = affine_around(pet_matrix, PET_SHAPE, CENTRE_MM)
    pet = phantom(PET_SHAPE, pet_affine, 10.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in PET_SHAPE], indexing="ij"), axis=-1)
    distance = np.linalg.norm(voxel_to_world(pet_affine, ijk) - CENTRE_MM, axis=-1)
    mask = np.where(distance <= 12.0, 3, 0).astype(np.int32)
    voxel_ml = abs(np.linalg.det(pet_matrix)) / 1000

    measured = measure_lesion(mask, pet_affine, 3, pet, pet_affine)

    # A voxelised 12 mm ball: its centroid is within a fraction of a voxel of the true centre.
    assert np.linalg.norm(measured.centroid_mm - CENTRE_MM) < 1.0
    assert measured.volume_ml == pytest.approx(np.count_nonzero(mask) * voxel_ml)
    assert measured.volume_ml == pytest.approx(4 / 3 * np.pi * 12.0**3 / 1000, rel=0.15)
    assert measured.suvmax == pytest.approx(float(pet[mask == 3].max()))
    hottest = np.unravel_index(np.argmax(np.where(mask == 3, pet, -1)), PET_SHAPE)
    assert np.allclose(measured.suvmax_mm, voxel_to_world(pet_affine, hottest))
    with pytest.raises(ValueError, match="label 4"):
        measure_lesion(mask, pet_affine, 4, pet, pet_affine)


@pytest.mark.parametrize("case", ["axis-aligned anisotropic", "flipped (LPS-like)", "oblique"])
def test_lesion_ct_density_reads_the_ct_through_its_own_affine(case):
    # CT on its own (oblique, flipped, finer, shifted) grid whose HU is a known linear field of
    # world position: the mask's mean density must be that field at the mask's centroid, to
    # within the rounding of each mask voxel to the CT voxel containing it (at most half a CT
    # voxel along each axis, systematic where the grids are commensurate).
    pet_matrix, ct_matrix = CASES[case]
    pet_affine = affine_around(pet_matrix, PET_SHAPE, CENTRE_MM)
    ct_affine = affine_around(ct_matrix * 0.5, CT_SHAPE, CENTRE_MM + 7.0)
    field = np.array([3.0, -2.0, 1.0])  # HU per world mm along x, y, z
    ct = voxel_to_world(ct_affine, np.stack(np.meshgrid(*[np.arange(n) for n in CT_SHAPE], indexing="ij"),
                                            axis=-1)) @ field
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in PET_SHAPE], indexing="ij"), axis=-1)
    mask = np.where(np.linalg.norm(voxel_to_world(pet_affine, ijk) - CENTRE_MM, axis=-1) <= 12.0, 3, 0)
    pet = phantom(PET_SHAPE, pet_affine, 10.0)

    measured = measure_lesion(mask, pet_affine, 3, pet, pet_affine, ct, ct_affine)

    rounding = 0.5 * np.abs(field @ ct_affine[:3, :3]).sum()
    assert measured.hu_mean == pytest.approx(float(measured.centroid_mm @ field), abs=rounding)
    assert rounding < 10
    assert abs(float(CENTRE_MM @ field)) > 100  # the field is not ~0 at the lesion by luck
    assert np.isnan(measure_lesion(mask, pet_affine, 3, pet, pet_affine).hu_mean)  # no CT: unknown


def test_suvmax_of_a_mask_on_a_finer_grid_uses_native_pet_voxels():
    pet_affine = affine_around(np.diag([4.0, 4.0, 3.0]), PET_SHAPE, CENTRE_MM)
    pet = phantom(PET_SHAPE, pet_affine, 10.0)
    mask_affine = affine_around(np.diag([-2.0, 2.0, 1.5]), (40, 40, 40), CENTRE_MM)
    ijk = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), axis=-1)
    distance = np.linalg.norm(voxel_to_world(mask_affine, ijk) - CENTRE_MM, axis=-1)
    mask = np.where(distance <= 6.0, 1, 0).astype(np.int32)

    measured = measure_lesion(mask, mask_affine, 1, pet, pet_affine)

    assert measured.suvmax in set(pet.ravel().tolist()), "SUVmax must be a native PET voxel value"
    assert measured.volume_ml == pytest.approx(np.count_nonzero(mask) * 6.0 / 1000)
    assert np.linalg.norm(measured.centroid_mm - CENTRE_MM) < 0.5


def test_world_voxel_round_trip_oblique():
    affine = affine_around(OBLIQUE, PET_SHAPE, CENTRE_MM)
    points = np.random.default_rng(0).uniform(-50, 50, size=(7, 5, 3))
    assert np.allclose(voxel_to_world(affine, world_to_voxel(affine, points)), points)
    # The affine's own definition: column j of the linear part is one step along voxel axis j.
    assert np.allclose(voxel_to_world(affine, [0, 1, 0]) - voxel_to_world(affine, [0, 0, 0]),
                       affine[:3, 1])


def test_crop_grid_orientation_and_exact_centre():
    grid = crop_grid_mm(CENTRE_MM, SIZE_MM, SPACING_MM)
    assert grid.shape == (N, N, N, 3)
    assert np.array_equal(grid[N // 2, N // 2, N // 2], CENTRE_MM)
    assert np.allclose(grid[1, 0, 0] - grid[0, 0, 0], [0, 0, SPACING_MM])  # D along +z
    assert np.allclose(grid[0, 1, 0] - grid[0, 0, 0], [0, SPACING_MM, 0])  # H along +y
    assert np.allclose(grid[0, 0, 1] - grid[0, 0, 0], [SPACING_MM, 0, 0])  # W along +x
    assert np.allclose(grid[MARKER_VOXEL], CENTRE_MM + MARKER_OFFSET_MM)
    # Odd sizes and per-axis spacing (z, y, x) keep the n//2 voxel on the centre.
    odd = crop_grid_mm((0, 0, 0), (9, 10, 12), (3, 2, 4))
    assert odd.shape == (3, 5, 3, 3) and np.array_equal(odd[1, 2, 1], [0, 0, 0])
    assert np.allclose(odd[2, 4, 2], [4, 4, 3])
    assert crop_shape(64, 2) == (N, N, N)
    with pytest.raises(ValueError):
        crop_shape(64, 0)


def test_trilinear_is_exact_for_a_linear_field_on_an_oblique_grid():
    affine = affine_around(OBLIQUE, PET_SHAPE, CENTRE_MM)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in PET_SHAPE], indexing="ij"), axis=-1)

    def field(xyz):
        return 0.5 * xyz[..., 0] - 0.25 * xyz[..., 1] + 0.125 * xyz[..., 2] + 7.0

    volume = field(voxel_to_world(affine, ijk)).astype(np.float64)
    points = CENTRE_MM + np.random.default_rng(1).uniform(-20, 20, size=(200, 3))
    assert inside_field_of_view(PET_SHAPE, affine, points).all()
    values = sample_world(volume, affine, points, order=1)
    assert values.dtype == np.float32
    assert np.allclose(values, field(points), atol=1e-3)


def test_nearest_returns_the_containing_voxel_label():
    affine = affine_around(np.diag([-3.0, 2.0, 4.0]), (10, 12, 8), (0.0, 0.0, 0.0))
    labels = np.arange(10 * 12 * 8, dtype=np.int32).reshape(10, 12, 8)
    points = np.random.default_rng(2).uniform(-10, 10, size=(300, 3))
    expected_ijk = np.rint(world_to_voxel(affine, points)).astype(int)
    expected = labels[tuple(expected_ijk.T)]

    nearest = sample_world(labels, affine, points, order=0)
    trilinear = sample_world(labels, affine, points, order=1)

    assert nearest.dtype == np.int32 and np.array_equal(nearest, expected)
    assert not np.array_equal(trilinear, expected.astype(np.float32)), "trilinear blends labels"
    with pytest.raises(ValueError):
        sample_world(labels, affine, points, order=3)


def test_outside_the_field_of_view_is_padded_and_flagged():
    affine = affine_around(np.diag([-4.0, 4.0, 3.0]), PET_SHAPE, CENTRE_MM)
    pet = np.full(PET_SHAPE, 2.0, dtype=np.float32)
    ct = np.full(PET_SHAPE, 40.0, dtype=np.float32)
    low, high = image_bounds_mm(PET_SHAPE, affine)
    # Centre 10 mm inside the +x edge of the field of view: the crop's +x side sticks out.
    near_edge = np.array([high[0] - 10.0, CENTRE_MM[1], CENTRE_MM[2]])

    crops, edge = crop_volumes(pet, affine, ct, affine, np.stack([CENTRE_MM, near_edge]),
                               SIZE_MM, SPACING_MM)

    assert edge.tolist() == [False, True]
    assert crops[0, 0].min() == 2.0 and crops[0, 1].min() == 40.0
    grid_x = crop_grid_mm(near_edge, SIZE_MM, SPACING_MM)[..., 0]
    outside = grid_x > high[0]
    assert outside.any() and (~outside).any()
    assert np.all(crops[1, 0][outside] == PET_PAD_SUV) and np.all(crops[1, 1][outside] == CT_PAD_HU)
    assert np.all(crops[1, 0][~outside] == 2.0) and np.all(crops[1, 1][~outside] == 40.0)
    # The outer half of the edge voxels still belongs to the image.
    half_voxel = np.array([[high[0] - 0.1, CENTRE_MM[1], CENTRE_MM[2]],
                           [high[0] + 0.1, CENTRE_MM[1], CENTRE_MM[2]]])
    assert sample_world(pet, affine, half_voxel, cval=-1.0).tolist() == [2.0, -1.0]


def test_image_bounds_match_brute_force_corners():
    affine = affine_around(OBLIQUE, (5, 6, 7), CENTRE_MM)
    low, high = image_bounds_mm((5, 6, 7), affine)
    corners = np.array([[i, j, k] for i in (-0.5, 4.5) for j in (-0.5, 5.5) for k in (-0.5, 6.5)])
    world = voxel_to_world(affine, corners)
    assert np.allclose(low, world.min(axis=0)) and np.allclose(high, world.max(axis=0))


def test_planes_come_from_the_centre_voxel():
    pet_affine = affine_around(np.diag([-4.0, -4.0, 3.0]), PET_SHAPE, CENTRE_MM)
    pet = phantom(PET_SHAPE, pet_affine, 10.0)
    crops, _ = crop_volumes(pet, pet_affine, pet * 80, pet_affine, CENTRE_MM[None], SIZE_MM, SPACING_MM)
    crop_set = CropSet(images=crops, lesions=None, patients=None, meta={})

    axial, coronal, sagittal = (crop_set.planes(v) for v in ("axial", "coronal", "sagittal"))

    assert np.array_equal(axial, crops[:, :, N // 2]) and axial.shape == (1, 3, N, N)
    assert np.array_equal(coronal, crops[:, :, :, N // 2])
    assert np.array_equal(sagittal, crops[:, :, :, :, N // 2])
    for plane in (axial, coronal, sagittal):
        assert np.unravel_index(np.argmax(plane[0, 0]), (N, N)) == (N // 2, N // 2)
    # The marker (+20 mm x, -10 mm z) shows in the coronal plane (rows z, columns x) at
    # row 16 - 5, column 16 + 10, and is absent from the axial plane through the centre.
    row, col = MARKER_VOXEL[0], MARKER_VOXEL[2]
    assert coronal[0, 0, row, col] > 0.5 * coronal[0, 0].max()
    assert axial[0, 0, N // 2, col] < 0.05 * axial[0, 0].max()
    with pytest.raises(ValueError):
        crop_set.planes("oblique")
