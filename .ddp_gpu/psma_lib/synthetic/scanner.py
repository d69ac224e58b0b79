"""Stage 2b: what the scanners see of the phantom, and :func:`render_patient`, the whole stage 2.

PET: the fine-grid activity blurred by the point-spread function, averaged into PET voxels
(partial volume) plus signal-dependent, spatially correlated noise; the lesion mask is resampled
onto the PET grid. CT: the HU blurred by the slice profile and sampled on the CT's own grid (own
spacing and origin, x/y possibly stored flipped) plus noise inside the body.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .phantom import (
    Phantom,
    PlacedLesions,
    anatomy,
    interp_axis,
    new_phantom,
    pet_block,
    place_lesions,
    random_fields,
    tissue_volumes,
)
from .spec import ImagingSpec


def recovery_coefficient(diameter_mm: float, fwhm_mm: float, voxel_mm) -> float:
    """Expected measured/true SUVmax of a uniform sphere (Gaussian PSF + voxel averaging).

    Centre value of a sphere of radius r blurred by a Gaussian of sd s:
    erf(a / sqrt 2) - sqrt(2 / pi) * a * exp(-a^2 / 2), a = r / s, with s^2 = (FWHM / 2.355)^2
    + mean(voxel^2) / 12. Floored at 0.2 so that 5 mm lesions do not get absurd peaks.

    >>> round(recovery_coefficient(30.0, 6.0, (4, 4, 3)), 2)
    1.0
    >>> round(recovery_coefficient(8.0, 6.0, (4, 4, 3)), 2)
    0.45
    """
    sd = np.sqrt((fwhm_mm / (2 * np.sqrt(2 * np.log(2)))) ** 2 + np.mean(np.square(voxel_mm)) / 12)
    a = diameter_mm / 2 / sd
    rc = math.erf(a / np.sqrt(2)) - np.sqrt(2 / np.pi) * a * np.exp(-(a**2) / 2)
    return float(max(rc, 0.2))


def _block_mean(vol: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``factor`` voxels (a trailing partial block is dropped).

    >>> _block_mean(np.arange(8.0).reshape(2, 2, 2), (2, 2, 2)).tolist()
    [[[3.5]]]
    """
    n = [s // f for s, f in zip(vol.shape, factor, strict=True)]
    v = vol[: n[0] * factor[0], : n[1] * factor[1], : n[2] * factor[2]]
    return v.reshape(n[0], factor[0], n[1], factor[1], n[2], factor[2]).mean(axis=(1, 3, 5))


def _peak_activity(les: dict, spec: ImagingSpec) -> float:
    """Activity to paint at a lesion's peak: its ``suvmax_true``, divided by the expected
    recovery when the drawn SUVmax are measured values (``spec.suvmax_is_measured``)."""
    peak = les["suvmax_true"]
    if spec.suvmax_is_measured:  # published SUVmax are measured: undo the expected PV loss
        voxel = np.asarray(spec.pet_spacing_mm, float)
        d_eq = float(np.cbrt(les["diameter_mm"] * les["axis2_mm"] * les["axis3_mm"]))
        peak /= spec.suvmax_recovery_factor * recovery_coefficient(d_eq, spec.psf_fwhm_mm, voxel)
    return peak


def simulate_pet(act: np.ndarray, ph: Phantom, spec: ImagingSpec,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """PET SUV volume (float32) and its affine: PSF blur on the fine grid, block mean, noise."""
    ph_sp, factor = ph.spacing, pet_block(spec)
    sigma = spec.psf_fwhm_mm / (2 * np.sqrt(2 * np.log(2))) / ph_sp
    clean = _block_mean(ndimage.gaussian_filter(act, sigma, mode="constant"), factor)
    cs = spec.pet_noise_correlation_vox
    noise = ndimage.gaussian_filter(rng.standard_normal(clean.shape).astype(np.float32), cs)
    noise /= np.float32((1 / (2 * np.sqrt(np.pi) * cs)) ** 1.5)
    pet = np.maximum(clean + np.sqrt(spec.pet_noise_gain * np.maximum(clean, 0)) * noise, 0).astype(np.float32)
    pet_sp = ph_sp * factor
    pet_affine = np.diag([*pet_sp, 1.0])
    pet_affine[:3, 3] = [ph.x[0] - ph_sp[0] / 2 + pet_sp[0] / 2, ph.y[0] - ph_sp[1] / 2 + pet_sp[1] / 2,
                         ph.z[0] - ph_sp[2] / 2 + pet_sp[2] / 2]
    return pet, pet_affine


def pet_mask(lesions: list[dict], placed: PlacedLesions, factor: tuple[int, ...],
             pet_shape: tuple[int, ...], pet_affine: np.ndarray) -> np.ndarray:
    """Lesion mask on the PET grid: a PET voxel belongs to lesion k when >= half of it does.

    Every lesion keeps at least one voxel: a tiny one its most-covered voxel, one covered by a
    later, overlapping lesion the voxel at its centre.
    """
    fine = placed.label
    mask = np.zeros(pet_shape, np.uint8)
    for les, sl in zip(lesions, placed.boxes, strict=True):
        k = les["mask_label"]
        lo = [s.start // f * f for s, f in zip(sl, factor, strict=True)]
        hi = [min(-(-s.stop // f) * f, n) for s, f, n in zip(sl, factor, fine.shape, strict=True)]
        part = fine[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == k
        frac = _block_mean(part.astype(np.float32), factor)
        view = mask[lo[0] // factor[0]:hi[0] // factor[0], lo[1] // factor[1]:hi[1] // factor[1],
                    lo[2] // factor[2]:hi[2] // factor[2]]
        if frac.max() < 0.5:  # tiny lesion: keep its most-covered voxel so it stays in the mask
            view[np.unravel_index(np.argmax(frac), frac.shape)] = k
        view[frac >= 0.5] = k
    missing = {les["mask_label"] for les in lesions} - set(np.unique(mask).tolist())
    for les, centre in zip(lesions, placed.centres, strict=True):  # covered by a later, overlapping lesion
        if les["mask_label"] in missing:
            ijk = np.round(np.linalg.solve(pet_affine, [*centre, 1])[:3]).astype(int)
            mask[tuple(np.clip(ijk, 0, np.array(mask.shape) - 1))] = les["mask_label"]
    return mask


def _ct_grid(ph: Phantom, spec: ImagingSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The CT's own grid: random in-plane spacing, origin jitter and (LPS-like) flip.

    Returns the CT affine and the number of CT voxels along each axis.
    """
    ph_sp = ph.spacing
    ct_in = rng.uniform(*spec.ct_inplane_mm)
    ct_sp = np.array([ct_in, ct_in, spec.ct_slice_mm])
    jitter = rng.uniform(-spec.ct_origin_jitter_mm, spec.ct_origin_jitter_mm, 3)
    lo_w = np.array([ph.x[0], ph.y[0], ph.z[0]]) - ph_sp / 2 + jitter * [1, 1, 0.3]
    hi_w = np.array([ph.x[-1], ph.y[-1], ph.z[-1]]) + ph_sp / 2 + jitter * [1, 1, 0.3]
    n_ct = np.floor((hi_w - lo_w) / ct_sp).astype(int)
    flip = rng.random() < spec.ct_flip_fraction
    ct_affine = np.diag([*ct_sp, 1.0])
    ct_affine[:3, 3] = lo_w + ct_sp / 2
    if flip:  # LPS-like storage: index i runs towards -x, j towards -y
        for a in (0, 1):
            ct_affine[a, a] = -ct_sp[a]
            ct_affine[a, 3] = lo_w[a] + ct_sp[a] * (n_ct[a] - 0.5)
    return ct_affine, n_ct


def simulate_ct(hu: np.ndarray, ph: Phantom, spec: ImagingSpec,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CT HU volume (int16) and its affine.

    Slice-profile/partial-volume blur, then sampled on the CT's own grid (finer in-plane, 3 mm
    slices, own origin, x/y possibly stored flipped), plus quantum noise inside the body.
    """
    ph_sp = ph.spacing
    ct_affine, n_ct = _ct_grid(ph, spec, rng)
    smooth = ndimage.gaussian_filter(hu, (0.4, 0.4, spec.ct_slice_mm / 2.355 / ph_sp[2]))
    ct = smooth
    for a, coords in enumerate((ph.x, ph.y, ph.z)):
        world = ct_affine[a, a] * np.arange(n_ct[a]) + ct_affine[a, 3]
        ct = interp_axis(ct, a, (world - coords[0]) / ph_sp[a])
    # The phantom has a 15 mm air margin, so edge-clamped samples beyond it are air.
    body = ct > -900
    ct = ct + body * rng.normal(0, spec.ct_noise_hu, ct.shape).astype(np.float32)
    ct = np.clip(np.round(ct), -1024, 3071).astype(np.int16)
    return ct, ct_affine


def render_patient(pid: str, bmi: float, lesions: list[dict], rng: np.random.Generator,
                   spec: ImagingSpec) -> dict:
    """Draw one patient's anatomy, place and paint the lesions, simulate PET and CT.

    Args:
        pid: patient id (error messages only).
        bmi: body-mass index (kg/m^2); sets body size and subcutaneous fat.
        lesions: rows of :func:`sample_tables` ``.lesions`` for this patient.
        rng: the patient's own random stream.
        spec: imaging spec.

    Returns:
        dict with ``pet`` float32 (I, J, K) SUV and ``pet_affine``; ``ct`` int16 and ``ct_affine``
        (its own grid); ``mask`` uint8 on the PET grid; ``centres`` (n_lesions, 3) world mm;
        ``hosts`` (tissue at each centre); ``suvmax_pet`` (measured in the mask, after blur,
        partial volume and noise).
    """
    ph = new_phantom(bmi, spec)
    deform, texture = random_fields(ph.label.shape, rng)
    marks = anatomy(ph, rng, bmi, deform, texture)
    hu, act = tissue_volumes(ph, texture, rng)
    to_paint = [dict(les, peak_activity=_peak_activity(les, spec)) for les in lesions]
    placed = place_lesions(ph, hu, act, marks, texture, to_paint, rng, spec.lesion_edge_margin_mm)
    pet, pet_affine = simulate_pet(act, ph, spec, rng)
    mask = pet_mask(lesions, placed, pet_block(spec), pet.shape, pet_affine)
    ct, ct_affine = simulate_ct(hu, ph, spec, rng)
    suvmax_pet = [float(pet[mask == les["mask_label"]].max()) for les in lesions]
    return {"pet": pet, "pet_affine": pet_affine, "ct": ct, "ct_affine": ct_affine, "mask": mask,
            "centres": np.array(placed.centres), "hosts": placed.hosts, "suvmax_pet": suvmax_pet}
