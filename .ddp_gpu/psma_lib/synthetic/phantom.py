"""Stage 2a: the patient on a fine world-aligned grid: anatomy, tissue values, lesions.

The phantom grid (``ImagingSpec.phantom_spacing_mm``, 2 x 2 x 1.5 mm by default) holds a tissue
label per voxel. :func:`anatomy` paints body, organs, vessels and skeleton; :func:`tissue_volumes`
turns the labels into HU and PSMA activity; :func:`place_lesions` puts the lesions drawn by
:func:`~psma_lib.synthetic.outcome.sample_tables` into plausible host tissue and paints them.
Every function takes the patient's random stream and draws from it in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .spec import ImagingSpec

# Tissue classes of the fine phantom grid: (name, HU mean, SUV mean, HU texture sd).
_TISSUES = (
    ("air", -1000.0, 0.0, 0.0), ("fat", -105.0, 0.25, 6.0), ("soft", 40.0, 0.7, 8.0),
    ("visceral_fat", -95.0, 0.3, 10.0), ("bowel", 30.0, 3.0, 10.0), ("gas", -950.0, 0.05, 20.0),
    ("liver", 58.0, 5.0, 5.0), ("spleen", 48.0, 4.0, 5.0), ("kidney_cortex", 34.0, 24.0, 5.0),
    ("kidney_pelvis", 15.0, 10.0, 5.0), ("bladder", 8.0, 40.0, 4.0), ("prostate", 38.0, 2.5, 6.0),
    ("blood", 42.0, 1.5, 4.0), ("lung", -860.0, 0.2, 40.0), ("bone", 350.0, 1.0, 45.0),
    ("cortex", 1100.0, 0.4, 150.0), ("muscle", 50.0, 0.8, 6.0), ("csf", 12.0, 0.3, 4.0),
)
_T = {name: i for i, (name, *_rest) in enumerate(_TISSUES)}
_SOFT_LESION_HOSTS = {
    "lymph_node": {"soft", "fat", "visceral_fat", "muscle", "blood", "bowel"},
    "prostate": {"prostate", "soft", "bladder", "fat", "muscle"},
    "visceral": {"liver", "lung"},
}


class Phantom:
    """Fine world-aligned grid (RAS mm; axis 0 = x, 1 = y, 2 = z) with a tissue label volume.

    ``x``, ``y``, ``z``: voxel-centre coordinates (float32); ``spacing``: voxel size (mm).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.spacing = spacing
        self.label = np.zeros((len(x), len(y), len(z)), np.uint8)
        self._voxels: dict[str, np.ndarray] = {}

    def voxels_of(self, tissue: str) -> np.ndarray:
        """Flat indices of the voxels of one tissue (cached: call after the anatomy is painted)."""
        if tissue not in self._voxels:
            self._voxels[tissue] = np.flatnonzero(self.label == _T[tissue])
        return self._voxels[tissue]

    def tissue_at(self, point) -> str:
        """Name of the tissue at a world point (nearest voxel, clamped to the grid)."""
        idx = tuple(int(np.clip(np.searchsorted(c, v), 0, len(c) - 1))
                    for c, v in zip((self.x, self.y, self.z), point, strict=True))
        return _TISSUES[self.label[idx]][0]

    def box(self, lo, hi):
        """Slices of the voxels with lo <= coordinate <= hi, and the local coordinate grids."""
        sl = []
        for axis, coords in enumerate((self.x, self.y, self.z)):
            i0 = int(np.searchsorted(coords, lo[axis]))
            i1 = int(np.searchsorted(coords, hi[axis], side="right"))
            sl.append(slice(i0, max(i0, i1)))
        sl = tuple(sl)
        return sl, (self.x[sl[0], None, None], self.y[None, sl[1], None], self.z[None, None, sl[2]])

    def ellipsoid(self, centre, radii, tissue, cortex_mm=0.0, rotation_deg=0.0, deform=None):
        """Paint an ellipsoid (optionally rotated about z, deformed, with a cortical shell)."""
        # Rotation is about z only; deformation may stretch the outline by up to ~25 %.
        reach = np.array([max(radii[0], radii[1]), max(radii[0], radii[1]), radii[2]]) * 1.25
        sl, (x, y, z) = self.box(np.subtract(centre, reach), np.add(centre, reach))
        if min(s.stop - s.start for s in sl) == 0:
            return
        c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        u, v = c * dx + s * dy, -s * dx + c * dy
        r = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2)
        if deform is not None:
            r = r * (1 + deform[sl])
        self.paint(sl, r, tissue, cortex_mm / min(radii))

    def cylinder(self, p0, p1, radius, tissue, cortex_mm=0.0):
        """Paint a capsule of ``radius`` mm from point p0 to p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        sl, (x, y, z) = self.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if min(s.stop - s.start for s in sl) == 0:
            return
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / d.dot(d), 0, 1)
        dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
        self.paint(sl, dist / radius, tissue, cortex_mm / radius)

    def paint(self, sl, r, tissue, cortex_fraction):
        """Label the voxels of box ``sl`` with ``r < 1`` as ``tissue``; the outer shell as cortex."""
        view = self.label[sl]
        inside = r < 1
        view[inside] = tissue
        if cortex_fraction > 0:
            view[inside & (r > 1 - cortex_fraction)] = _T["cortex"]


def pet_block(spec: ImagingSpec) -> tuple[int, ...]:
    """Phantom voxels per PET voxel along x, y, z (a PET voxel is a block of phantom voxels).

    >>> pet_block(ImagingSpec())
    (2, 2, 2)
    """
    ph_sp = np.asarray(spec.phantom_spacing_mm, float)
    return tuple(int(round(p / f)) for p, f in zip(spec.pet_spacing_mm, ph_sp, strict=True))


def new_phantom(bmi: float, spec: ImagingSpec) -> Phantom:
    """An empty (air) phantom wide enough for a body of this BMI, over the z field of view.

    The grid is centred on x = y = 0 with a 15 mm air margin and holds whole PET voxels.
    """
    ph_sp = np.asarray(spec.phantom_spacing_mm, float)
    factor = pet_block(spec)
    size = np.sqrt(bmi / 27.0)
    half = (np.array([150 * size * 1.07 * 1.02, 105 * size * 1.07 * 1.02]) + 15)
    z0, z1 = spec.z_range_mm
    shape = [int(np.ceil(2 * half[0] / ph_sp[0])), int(np.ceil(2 * half[1] / ph_sp[1])),
             int(np.ceil((z1 - z0) / ph_sp[2]))]
    shape = [n + (-n) % f for n, f in zip(shape, factor, strict=True)]  # whole PET voxels
    x = (-half[0] + ph_sp[0] * (np.arange(shape[0]) + 0.5)).astype(np.float32)
    y = (-half[1] + ph_sp[1] * (np.arange(shape[1]) + 0.5)).astype(np.float32)
    z = (z0 + ph_sp[2] * (np.arange(shape[2]) + 0.5)).astype(np.float32)
    return Phantom(x, y, z, ph_sp)


def _smooth_field(shape, corr_vox, rng) -> np.ndarray:
    """Gaussian random field (unit sd) correlated over ~corr_vox voxels, by linear up-sampling."""
    coarse_shape = [int(np.ceil(n / c)) + 2 for n, c in zip(shape, corr_vox, strict=True)]
    out = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, corr_vox, strict=True)):
        out = interp_axis(out, axis, np.arange(n) / c + 0.5)
    return out / 0.75  # linear interpolation of white noise lowers the sd to ~0.75


def interp_axis(vol: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``vol`` along one axis at fractional indices (edge-clamped).

    >>> interp_axis(np.array([0.0, 10.0]), 0, np.array([-1.0, 0.25, 5.0])).tolist()
    [0.0, 2.5, 10.0]
    """
    coords = np.clip(coords, 0, vol.shape[axis] - 1)
    i0 = np.minimum(np.floor(coords).astype(int), vol.shape[axis] - 2) if vol.shape[axis] > 1 else np.zeros(len(coords), int)
    w = (coords - i0).astype(np.float32)
    shape = [1] * vol.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    a = np.take(vol, i0, axis=axis)
    if vol.shape[axis] == 1:
        return a
    return a * (1 - w) + np.take(vol, i0 + 1, axis=axis) * w


def random_fields(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth ``deform`` (organ outlines) and finer ``texture`` (unit sd) random fields."""
    deform = _smooth_field(shape, (20, 20, 27), rng)
    # Smoothed once more so that thresholds (bowel loops vs fat) have no piecewise-linear kinks.
    texture = ndimage.gaussian_filter(_smooth_field(shape, (5, 5, 7), rng), 1.5)
    texture /= texture.std()
    return deform, texture


# ------------------------------------------------------------------------------- anatomy
def anatomy(ph: Phantom, rng: np.random.Generator, bmi: float, deform: np.ndarray, texture: np.ndarray) -> dict:
    """Paint body, organs, vessels and skeleton; return the landmarks lesion placement needs.

    Later structures overwrite earlier ones, so the painting order is part of the anatomy.
    """
    axi, ayi = _paint_body(ph, rng, bmi, deform)
    y_spine = -ayi + 48  # vertebral body centre, posterior
    _paint_abdominal_cavity(ph, axi, ayi, texture)
    _paint_organs_and_muscles(ph, axi, ayi, y_spine, deform)
    bladder, prostate = _paint_pelvic_organs(ph, rng, ayi, y_spine, deform)
    iliac_chain, para_aortic = _paint_vessels(ph, ayi, y_spine)
    _paint_lung_bases(ph, axi, ayi)
    vertebrae = _paint_spine(ph, y_spine)
    _paint_pelvis_and_femora(ph, ayi, y_spine, deform)
    _paint_ribs(ph, axi, ayi)
    return {"vertebrae": vertebrae, "iliac_chain": iliac_chain, "para_aortic": para_aortic,
            "prostate": prostate, "bladder": bladder}


def _paint_body(ph: Phantom, rng, bmi: float, deform: np.ndarray) -> tuple[float, float]:
    """Body outline (subcutaneous fat) and soft tissue inside; return the inner half-axes (mm)."""
    size = math.sqrt(bmi / 27.0)  # Python floats keep the float32 grids in float32
    ax, ay = 150 * size * rng.uniform(0.93, 1.07), 105 * size * rng.uniform(0.93, 1.07)
    fat = float(np.clip(8 + 2.2 * (bmi - 20), 6, 45)) * rng.uniform(0.8, 1.2)
    X, Y, Z = ph.x[:, None, None], ph.y[None, :, None], ph.z[None, None, :]
    ax_z = ax * (0.9 + 0.12 * np.exp(-(((Z - 40) / 90) ** 2)))
    ay_z = ay * (0.9 + 0.12 * np.exp(-(((Z - 220) / 120) ** 2)))
    body_r = np.sqrt((X / ax_z) ** 2 + (Y / ay_z) ** 2) * (1 + 0.04 * deform)
    ph.label[body_r < 1] = _T["fat"]
    inner_r = np.sqrt((X / (ax_z - fat)) ** 2 + (Y / (ay_z - fat)) ** 2) * (1 + 0.04 * deform)
    ph.label[inner_r < 1] = _T["soft"]
    return ax * 0.95 - fat, ay * 0.95 - fat  # inner (sub-fascial) half-axes, mm


def _paint_abdominal_cavity(ph: Phantom, axi: float, ayi: float, texture: np.ndarray) -> None:
    """Visceral fat with bowel loops (moderate PSMA uptake) and gas pockets."""
    sl, (x, y, z) = ph.box((-axi, -ayi, 20), (axi, ayi, 330))
    cav = ((x / (axi - 20)) ** 2 + ((y - 15) / (ayi - 15)) ** 2) < 1
    cav = cav & (z > 20) & (z < 330)
    tex = texture[sl]
    view = ph.label[sl]
    view[cav] = _T["visceral_fat"]
    view[cav & (tex > -0.1)] = _T["bowel"]
    view[cav & (tex > 1.6)] = _T["gas"]


def _paint_organs_and_muscles(ph: Phantom, axi: float, ayi: float, y_spine: float,
                              deform: np.ndarray) -> None:
    """Liver, spleen, psoas/paraspinal/gluteal muscles, kidneys."""
    # Liver and spleen before the back muscles, which then bound them posteriorly.
    # RAS: +x is the patient's right, so the liver is at +x.
    ph.ellipsoid((0.35 * axi, 0.05 * ayi, 345), (0.62 * axi, 0.8 * ayi, 100), _T["liver"], deform=0.06 * deform)
    ph.ellipsoid((-0.62 * axi, -0.35 * ayi, 330), (32, 50, 55), _T["spleen"], deform=0.06 * deform)
    # Muscles: psoas, paraspinal, gluteal.
    for s in (-1, 1):
        ph.cylinder((s * 28, y_spine + 5, 300), (s * 55, y_spine + 25, 60), 20, _T["muscle"])
        ph.ellipsoid((s * 38, y_spine - 48, 260), (24, 20, 160), _T["muscle"], deform=0.05 * deform)
        ph.ellipsoid((s * (axi - 45), -ayi + 40, 40), (55, 45, 80), _T["muscle"], deform=0.05 * deform)
    for s, dz in ((1, -15), (-1, 0)):
        centre = (s * 68, y_spine + 8, 260 + dz)
        ph.ellipsoid(centre, (30, 26, 55), _T["kidney_cortex"], rotation_deg=s * 25, deform=0.04 * deform)
        ph.ellipsoid((centre[0] - s * 6, centre[1] + 4, centre[2]), (14, 12, 30), _T["kidney_pelvis"])


def _paint_pelvic_organs(ph: Phantom, rng, ayi: float, y_spine: float, deform: np.ndarray) -> tuple:
    """Bladder (random size), prostate and rectum; return the bladder and prostate centres."""
    bladder = (0.0, 0.42 * ayi, 45.0)
    ph.ellipsoid(bladder, np.array([45, 36, 34]) * rng.uniform(0.7, 1.2), _T["bladder"], deform=0.05 * deform)
    prostate = (0.0, 0.42 * ayi - 12, -8.0)
    ph.ellipsoid(prostate, (20, 16, 17), _T["prostate"])
    ph.cylinder((0, y_spine - 8, 95), (0, 0.1 * ayi - 10, -30), 15, _T["bowel"])  # rectum
    return bladder, prostate


def _paint_vessels(ph: Phantom, ayi: float, y_spine: float) -> tuple[list, list]:
    """Aorta, IVC, common + external iliac arteries; return the nodal chains (segments)."""
    aorta_y = y_spine + 32
    ph.cylinder((-8, aorta_y, 150), (-8, aorta_y, 400), 11, _T["blood"])
    ph.cylinder((22, aorta_y - 2, 140), (22, aorta_y - 2, 400), 12, _T["blood"])
    iliac_chain = []
    for s in (-1, 1):
        # Along the pelvic brim, anterior to the acetabulum, to the groin.
        mid, low = (s * 45, aorta_y, 80), (s * 75, 0.45 * ayi + 10, -25)
        ph.cylinder((-8, aorta_y, 150), mid, 7, _T["blood"])
        ph.cylinder(mid, low, 7, _T["blood"])
        iliac_chain += [((-8, aorta_y, 150), mid), (mid, low)]
    para_aortic = [((-8, aorta_y, 150), (-8, aorta_y, 330))]
    return iliac_chain, para_aortic


def _paint_lung_bases(ph: Phantom, axi: float, ayi: float) -> None:
    """Lung bases: above the diaphragm domes, posterior-lateral."""
    sl, (x, y, z) = ph.box((-axi, -ayi, 300), (axi, ayi, 500))
    dome = 420 - 70 * ((np.abs(x) - 0.5 * axi) / (0.5 * axi)) ** 2 - 60 * ((y - 0.4 * ayi) / ayi) ** 2
    thorax = ((x / (axi - 8)) ** 2 + (y / (ayi - 8)) ** 2 < 1) & (np.abs(x) > 35) & (z > dome)
    ph.label[sl][thorax] = _T["lung"]


def _paint_spine(ph: Phantom, y_spine: float) -> list[tuple[float, float, float]]:
    """Vertebrae (body, arch, processes, canal) and sacrum; return the vertebral body centres."""
    vertebrae = []
    for level, zc in enumerate(np.arange(140, 420, 34)):
        w = 22 + level * 0.5
        ph.ellipsoid((0, y_spine, zc), (w, 17, 15), _T["bone"], cortex_mm=2.0)
        ph.ellipsoid((0, y_spine - 30, zc), (17, 13, 12), _T["bone"], cortex_mm=2.0)
        ph.ellipsoid((0, y_spine - 52, zc - 4), (5, 16, 10), _T["bone"], cortex_mm=1.5)
        for s in (-1, 1):
            ph.ellipsoid((s * 34, y_spine - 26, zc), (17, 6, 7), _T["bone"], cortex_mm=1.5)
        ph.ellipsoid((0, y_spine - 30, zc), (9, 8, 20), _T["csf"])
        vertebrae.append((0.0, y_spine, float(zc)))
    for zc in np.arange(50, 135, 12):  # sacrum, narrowing downwards, curving posteriorly
        w = 16 + 34 * (zc - 40) / 85
        ph.ellipsoid((0, y_spine - 12 - (130 - zc) * 0.25, zc), (w, 16, 9), _T["bone"], cortex_mm=1.5)
    return vertebrae


def _paint_pelvis_and_femora(ph: Phantom, ayi: float, y_spine: float, deform: np.ndarray) -> None:
    """Ilia, acetabula, proximal femora, pubis and ischia, on both sides."""
    for s in (-1, 1):
        ph.ellipsoid((s * 88, y_spine + 10, 150), (72, 9, 55), _T["bone"], cortex_mm=2.0,
                     rotation_deg=s * 35, deform=0.05 * deform)  # iliac wing
        ph.ellipsoid((s * 78, -5, 55), (22, 30, 45), _T["bone"], cortex_mm=2.5)  # iliac body
        head = (s * 88, 8, 5)
        # Acetabulum: a bony cup over the head, superior and medial only.
        ph.ellipsoid((s * 80, 5, 15), (22, 26, 24), _T["bone"], cortex_mm=3.0)
        ph.ellipsoid(head, (25, 25, 25), _T["soft"])  # joint space
        ph.ellipsoid(head, (23, 23, 23), _T["bone"], cortex_mm=2.0)  # femoral head
        ph.cylinder(head, (s * 125, 0, -20), 15, _T["bone"], cortex_mm=2.5)  # neck
        ph.ellipsoid((s * 128, -3, -20), (17, 22, 22), _T["bone"], cortex_mm=2.5)  # trochanter
        ph.cylinder((s * 122, 5, -25), (s * 115, 10, -200), 15, _T["bone"], cortex_mm=5.0)  # shaft
        ph.ellipsoid((s * 22, 0.4 * ayi, -12), (20, 9, 12), _T["bone"], cortex_mm=2.0)  # pubis
        ph.ellipsoid((s * 58, -30, -40), (14, 20, 30), _T["bone"], cortex_mm=2.5)  # ischium


def _paint_ribs(ph: Phantom, axi: float, ayi: float) -> None:
    """Lower ribs: descend anteriorly, open in front."""
    for z_rib in (330.0, 360.0, 390.0, 420.0):
        sl, (x, y, z) = ph.box((-axi, -ayi, z_rib - 70), (axi, 0.3 * ayi, z_rib + 8))
        a, b = axi - 6, ayi - 6
        radial = (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1) * (a + b) / 2
        dz = z - (z_rib - 0.3 * (y + ayi))
        r = np.sqrt((radial / 5) ** 2 + (dz / 7) ** 2)
        ph.paint(sl, r, _T["bone"], 0.5)


def tissue_volumes(ph: Phantom, texture: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU and PSMA activity (SUV) of the painted tissues, with per-patient uptake and texture."""
    hu_mean = np.array([t[1] for t in _TISSUES], np.float32)
    hu_sd = np.array([t[3] for t in _TISSUES], np.float32)
    suv = np.array([t[2] for t in _TISSUES], np.float32) * np.exp(rng.normal(0, 0.2, len(_TISSUES))).astype(np.float32)
    suv[_T["bladder"]] *= np.float32(np.exp(rng.normal(0, 0.4)))
    hu = hu_mean[ph.label] + hu_sd[ph.label] * texture
    act = suv[ph.label] * (1 + 0.1 * texture)
    return hu, act


# ------------------------------------------------------------------------------- lesions
@dataclass
class PlacedLesions:
    """Where the lesions went: ``label`` (fine grid, lesion ``k`` = its ``mask_label``), and per
    lesion its world ``centre`` (mm), painted bounding ``box`` (slices) and ``host`` tissue."""

    label: np.ndarray
    centres: list[np.ndarray]
    boxes: list[tuple[slice, ...]]
    hosts: list[str]


def place_lesions(ph: Phantom, hu: np.ndarray, act: np.ndarray, marks: dict, texture: np.ndarray,
                  lesions: list[dict], rng: np.random.Generator, edge_mm: float) -> PlacedLesions:
    """Place each lesion (rows with a ``peak_activity``) in turn and paint it into ``hu``/``act``."""
    placed_lesions = PlacedLesions(np.zeros(ph.label.shape, np.uint8), [], [], [])
    placed = []  # (centre, radius) of the lesions so far, to keep them apart
    for les in lesions:
        radius = les["diameter_mm"] / 2
        centre = _place_lesion(les["site"], radius, ph, marks, placed, rng, edge_mm)
        host = ph.tissue_at(centre)
        placed_lesions.hosts.append(host)
        placed_lesions.boxes.append(_paint_lesion(ph, hu, act, placed_lesions.label, centre, les, host,
                                                  texture, rng))
        placed.append((centre, radius))
        placed_lesions.centres.append(centre)
    return placed_lesions


def _place_lesion(site: str, radius: float, ph: Phantom, marks: dict, placed: list, rng,
                  edge_mm: float) -> np.ndarray:
    """A world centre (mm) for a lesion of ``site``, away from lesions already placed."""
    best = None
    for _attempt in range(40):
        centre = _candidate_centre(site, radius, ph, marks, rng)
        gap = min((np.linalg.norm(centre - c) - radius - r for c, r in placed), default=np.inf)
        # Soft-tissue lesions must not sit in bone, air or an unrelated organ; no lesion sits
        # closer than ``edge_mm`` to the top/bottom of the field of view (a whole-body scan's
        # lesions are not cut by it).
        fits = (site == "bone" or ph.tissue_at(centre) in _SOFT_LESION_HOSTS[site]) and (
            ph.z[0] + edge_mm <= centre[2] <= ph.z[-1] - edge_mm)
        score = (fits, gap > 2.0, gap)
        if score[:2] == (True, True):
            return centre
        if best is None or score > best[0]:
            best = (score, centre)
    return best[1]


def _candidate_centre(site: str, radius: float, ph: Phantom, marks: dict, rng) -> np.ndarray:
    """One random candidate centre (mm) for a lesion of ``site``."""
    if site == "bone":
        i, j, k = np.unravel_index(rng.choice(ph.voxels_of("bone")), ph.label.shape)
        return np.array([ph.x[i], ph.y[j], ph.z[k]])
    if site == "lymph_node":
        chains = marks["iliac_chain"] + marks["para_aortic"]
        p0, p1 = (np.asarray(p) for p in chains[rng.integers(len(chains))])
        angle = rng.uniform(0, 2 * np.pi)
        offset = (radius + rng.uniform(9, 14)) * np.array([np.cos(angle), np.sin(angle), 0.0])
        return p0 + rng.random() * (p1 - p0) + offset
    if site == "prostate":
        return np.asarray(marks["prostate"]) + rng.uniform(-7, 7, 3)
    # visceral: liver, or a lung base when the dice say so and lung is in view
    organ = "lung" if rng.random() < 0.3 and len(ph.voxels_of("lung")) else "liver"
    i, j, k = np.unravel_index(rng.choice(ph.voxels_of(organ)), ph.label.shape)
    return np.array([ph.x[i], ph.y[j], min(ph.z[k], ph.z[-1] - radius - 6)])


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _paint_lesion(ph: Phantom, hu, act, lesion_lab, centre, les: dict, host: str,
                  texture: np.ndarray, rng) -> tuple:
    """Write one lesion into the HU, activity and lesion-label volumes; return its bounding box."""
    semi = np.array([les["diameter_mm"], les["axis2_mm"], les["axis3_mm"]]) / 2
    reach = semi.max() * 1.3 + 2
    sl, (x, y, z) = ph.box(centre - reach, centre + reach)
    rot = _random_rotation(rng)
    d = [x - centre[0], y - centre[1], z - centre[2]]
    u = [rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2] for a in range(3)]
    r_ell = np.sqrt(sum((u[a] / semi[a]) ** 2 for a in range(3)))
    norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    lobulation = np.ones_like(r_ell)
    amplitude = rng.uniform(0.05, 0.18)
    for _ in range(3):  # irregular, lobulated outline
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        cosang = (d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / norm
        lobulation = lobulation + amplitude / 3 * np.cos(rng.integers(2, 5) * np.pi * cosang + rng.uniform(0, 2 * np.pi))
    r = r_ell / lobulation
    inside = r < 1
    nec = les["necrosis"]
    core = np.exp(-((r / 0.65) ** 2))  # 1 at the centre, ~0.1 at the rim
    heterogeneity = np.clip(0.85 + 0.15 * texture[sl], 0.4, 1.0)
    edge = np.clip((1 - r) / 0.15, 0, 1)
    uptake = les["peak_activity"] * heterogeneity * (1 - nec * core)
    act[sl] = np.where(inside, np.maximum(uptake * edge, act[sl] * (1 - edge)), act[sl])
    hu[sl] = np.where(inside, _lesion_hu(ph, sl, les["site"], host, nec, core, heterogeneity), hu[sl])
    lesion_lab[sl][inside] = les["mask_label"]
    return sl


def _lesion_hu(ph: Phantom, sl, site: str, host: str, nec: float, core: np.ndarray,
               heterogeneity: np.ndarray) -> np.ndarray:
    """CT HU of a lesion over its box: bone sclerotic (necrosis ~0) to lytic, soft tissue else."""
    if site == "bone":  # sclerotic (necrosis ~0) ... lytic (necrosis ~1)
        lesion_hu = 220 + 800 * (1 - nec) * (0.8 + 0.2 * heterogeneity) + 120 * (1 - core) * (1 - nec)
        # Bone-forming only inside bone; an extra-osseous component is soft tissue.
        in_bone = (ph.label[sl] == _T["bone"]) | (ph.label[sl] == _T["cortex"])
        return np.where(in_bone, lesion_hu, 45 - 30 * nec * core)
    if site == "visceral" and host == "liver":
        return 38 - 25 * nec * core
    # nodes, prostate bed, lung nodules: soft tissue with a hypodense necrotic core
    return 42 - 32 * nec * core
