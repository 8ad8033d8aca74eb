"""How the change a registered model decides on its grid reaches the scan at the scan's resolution.

The model gives, on its grid in reference space, the factual reconstruction ``rec`` and the
counterfactual ``cf`` (window units). Ways to put their difference onto the patient's scan:

- ``"intensity"``: ``scan + carry_back(cf - rec)``, the difference upsampled through the inverse
  registration. Simple, exact for a null intervention, but a 6 mm change is a blurred one at 2 mm.
- ``"deformation"``: anatomy changes by moving tissue, so the change is a smooth, invertible
  deformation of ``rec`` onto ``cf`` which warps the *scan itself* at its own resolution (its edges stay
  sharp and move); what the deformation does not explain (tissue turning into CSF) is added as the
  upsampled intensity residual ``cf - rec o phi``. The deformation is confined to the reference's head,
  and a model may keep it further from the head's surface (``inset_mm``, the checkpoint's
  ``image.deformation_inset_mm``): skull and scalp do not move as a brain atrophies, and near the
  surface atrophy is cortex thinning in place, which a 6 mm model's smooth deformation renders as the
  whole surface (skull included) moving; deeper in, it is the ventricles growing, a movement.
  A model whose first stage codes shape (:class:`cdae_med.latent.DeformationAutoencoder`) decides the
  deformation itself (:func:`model_deformation`: the change of its decoded displacement, integrated as a
  stationary velocity field); for any other model it is found afterwards, by SimpleITK's diffeomorphic
  demons from ``rec`` onto ``cf`` on the model grid (:func:`fit_deformation`, Vercauteren et al. 2009).

- ``"ventricles"`` and ``"volumes"`` (:class:`AnatomicalRealisation`): the volumes the causal model decides put
  on the subject's own anatomy, its ventricles pushed to the model's ventricle-volume change
  (:mod:`pipelines.anatomy`) and its intensity change elsewhere, for ``"volumes"`` scaled where brain meets CSF
  to the model's brain-volume change.

Either way, the intensity part (all of the change, or the residual) is a change decided on the model's grid.
``residual="upsampled"`` adds it as upsampled; ``residual="tissue"`` (:func:`onto_tissue`) moves it, within
each model voxel, onto the scan's own tissue boundaries: a 6 mm model can say that a region darkens, not
which 2 mm voxels do, and in an atrophying brain (as in the generator) those are the partial-volume voxels
where tissue meets CSF, where the scan's gradient is.

Which measures better is in ``benchmarks/results/brain_native.json`` (per realisation, with the oracle).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from .mri import PreparedScan, restore_change
from .registration import _LPS, Registration, _array, to_sitk

__all__ = ["REALISATIONS", "RESIDUALS", "AnatomicalRealisation", "GridDeformation", "onto_tissue", "carry_change", "fit_deformation", "model_deformation", "deform_scan",
           "deformation_change", "jacobian_determinant"]

log = logging.getLogger("cdae_med")

REALISATIONS = ("intensity", "deformation", "ventricles", "volumes")
RESIDUALS = ("upsampled", "tissue")

# onto_tissue's weights: edge strength from the scan's gradient at TISSUE_EDGE_MM, to TISSUE_POWER; a floor (a
# share of the scan's 1-99 % range) keeps a flat region's change where the model put it; the change is moved
# within TISSUE_SPREAD of the model's spacing. Chosen with the oracle (the true change on the model grid) on the
# validation subjects of benchmarks/brain_native.py: benchmarks/results/brain_tissue_weights.json.
TISSUE_EDGE_MM = 2.0
TISSUE_POWER = 2.0
TISSUE_FLOOR = 0.02
TISSUE_SPREAD = 2.0 / 3.0


def onto_tissue(change: np.ndarray, scan: np.ndarray, spacing_mm, model_spacing_mm: float, *,
                edge_mm: float = TISSUE_EDGE_MM, power: float = TISSUE_POWER, floor: float = TISSUE_FLOOR,
                spread: float = TISSUE_SPREAD, keep_sum: bool = False) -> np.ndarray:
    """A change upsampled from the model's grid onto a scan (``change``, the scan's grid and units) moved
    onto the scan's own tissue boundaries: multiplied by w / G(w), with w the gradient magnitude of the
    scan to ``power`` (plus a floor) and G a Gaussian of ``spread`` model voxels. Near an edge the change
    is taken from the flat tissue beside it and put on the edge; far from any edge it stays as upsampled;
    nowhere is it made larger in sum, and a zero change stays zero. ``keep_sum``: spread it so that its
    local sum is kept exactly, w G(change / G(w)) (measured worse against the oracle)."""
    from scipy.ndimage import gaussian_filter, gaussian_gradient_magnitude

    spacing = np.asarray(spacing_mm, dtype=np.float64)
    data = np.asarray(scan, dtype=np.float32)
    lo, hi = np.percentile(data[::2, ::2, ::2], [1, 99])
    edges = gaussian_gradient_magnitude(data, edge_mm / spacing) / max(float(hi - lo), 1e-12)
    w = edges ** power + floor ** power
    sigma = spread * model_spacing_mm / spacing
    out = w * gaussian_filter(change / gaussian_filter(w, sigma), sigma) if keep_sum else \
        change * w / gaussian_filter(w, sigma)
    return out.astype(np.float32)


def carry_change(prepared: PreparedScan, change: np.ndarray, residual: str = "upsampled",
                 scan: np.ndarray | None = None) -> np.ndarray:
    """A change on the model's grid (window units) on the scan's grid, in its units: upsampled through the
    inverse registration (:func:`pipelines.mri.restore_change`), then, for ``residual="tissue"``, moved onto
    the tissue boundaries of ``scan`` (the scan the change is added to; the input's by default)."""
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    out = restore_change(prepared, change)
    if residual == "tissue":
        out = onto_tissue(out, prepared.scan.data if scan is None else scan, prepared.scan.spacing,
                          float(prepared.prep.spacing_mm[0]))
    return out


class GridDeformation:
    """A displacement field on the model grid (reference space, ITK's LPS mm): a point x of the
    counterfactual samples the factual image at x + u(x)."""

    def __init__(self, field, grid_affine: np.ndarray):
        self.field, self.grid_affine = field, grid_affine

    @classmethod
    def from_displacement(cls, displacement: np.ndarray, grid_affine: np.ndarray) -> "GridDeformation":
        """From an (X, Y, Z, 3) displacement in mm, ITK's LPS axes (as :attr:`displacement` gives it)."""
        import SimpleITK as sitk

        field = sitk.GetImageFromArray(np.asarray(displacement, np.float64).transpose(2, 1, 0, 3), isVector=True)
        field.CopyInformation(to_sitk(np.zeros(displacement.shape[:3], np.float32), grid_affine))
        return cls(field, grid_affine)

    @property
    def displacement(self) -> np.ndarray:
        """(X, Y, Z, 3) float64, mm in ITK's LPS axes."""
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(self.field).transpose(2, 1, 0, 3)

    def transform(self):
        import SimpleITK as sitk

        return sitk.DisplacementFieldTransform(sitk.Cast(self.field, sitk.sitkVectorFloat64))

    def warp_grid(self, data: np.ndarray) -> np.ndarray:
        """A volume on the model grid warped by the deformation (linear)."""
        import SimpleITK as sitk

        image = to_sitk(data, self.grid_affine)
        return _array(sitk.Resample(image, image, self.transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def fit_deformation(rec: np.ndarray, cf: np.ndarray, grid_affine: np.ndarray, mask: np.ndarray,
                    iterations: int = 40, smoothing_voxels: float = 1.0, inset_mm: float = 0.0) -> GridDeformation:
    """The diffeomorphic-demons deformation that carries ``rec`` onto ``cf`` (both on the model grid),
    multiplied by the (smoothed) head ``mask`` so that nothing outside the head moves (nor within
    ``inset_mm`` of its surface, :func:`head_weight`)."""
    import SimpleITK as sitk

    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing_voxels)  # in voxels: the filter smooths on the image grid
    demons.SetSmoothDisplacementField(True)
    field = demons.Execute(to_sitk(cf.astype(np.float32), grid_affine), to_sitk(rec.astype(np.float32), grid_affine))
    spacing = float(np.linalg.norm(np.asarray(grid_affine)[:3, 0]))
    u = sitk.GetArrayFromImage(field) * head_weight(mask, inset_mm, spacing).transpose(2, 1, 0)[..., None]
    out = sitk.GetImageFromArray(u, isVector=True)
    out.CopyInformation(field)
    return GridDeformation(out, grid_affine)


def head_weight(mask: np.ndarray, inset_mm: float = 0.0, spacing_mm: float = 1.0) -> np.ndarray:
    """The head ``mask`` smoothed to [0, 1]: a deformation times it moves nothing outside the head. With
    ``inset_mm``, nothing within that distance of the head's surface either (``spacing_mm``: the grid's)."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    inside = mask > 0.5
    if inset_mm > 0:
        inside = distance_transform_edt(inside) * spacing_mm > inset_mm
    return np.clip(gaussian_filter(inside.astype(np.float32), 1.0), 0, 1)


def model_deformation(displacement_rec: np.ndarray, displacement_cf: np.ndarray, grid_affine: np.ndarray,
                      mask: np.ndarray, max_halvings: int = 10, inset_mm: float = 0.0) -> GridDeformation:
    """The deformation a shape-coding model decides: its decoded displacements from the template, of the
    reconstruction and of the counterfactual ((spatial_dims, X, Y, Z), voxels along the grid's axes), give
    rec(p + w) ~ cf(p) with w ~ v_cf - v_rec to first order. w, confined to the head, is integrated as a
    stationary velocity field (scaling and squaring, MONAI's ``DVF2DDF``), which is invertible in the
    continuum; on the grid a rough w can still fold, so it is halved until the Jacobian determinant is
    positive everywhere (a warning says so): the deformation folds nowhere, whatever the model decodes."""
    import torch
    from monai.networks.blocks import DVF2DDF

    spacing = float(np.linalg.norm(np.asarray(grid_affine)[:3, 0]))
    w = (np.asarray(displacement_cf, np.float32) - np.asarray(displacement_rec, np.float32)) * \
        head_weight(mask, inset_mm, spacing)
    with warnings.catch_warnings():  # MONAI notes that it uses torch's grid_sample, which is what we want
        warnings.simplefilter("ignore")
        integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros")
    # voxels along the grid's axes -> mm in ITK's LPS world
    to_mm = _LPS @ np.asarray(grid_affine, np.float64)[:3, :3]
    for halving in range(max_halvings + 1):
        ddf = integrate(torch.from_numpy(w / 2**halving)[None])[0].numpy()
        deformation = GridDeformation.from_displacement(np.einsum("ij,j...->...i", to_mm, ddf.astype(np.float64)),
                                                        grid_affine)
        if jacobian_determinant(deformation).min() > 0:
            if halving:
                log.warning("the model's deformation folded on the grid; applied at 1/%d of its size", 2**halving)
            return deformation
    raise RuntimeError("the model's deformation folds even at 1/%d of its size" % 2**max_halvings)


def deform_scan(registration: Registration, deformation: GridDeformation, data: np.ndarray | None = None) -> np.ndarray:
    """The scan (or ``data``, another volume on its grid), at its own resolution, warped by a deformation
    found in reference space: a scan point p samples the scan at T(T^-1(p) + u(T^-1(p))), with T the
    registration (reference -> scan). Linear in the data."""
    import SimpleITK as sitk

    scan = to_sitk(registration.scan.data if data is None else np.asarray(data, np.float32), registration.scan.affine)
    # SimpleITK's composite transform applies its last transform first
    composite = sitk.CompositeTransform([registration.transform, deformation.transform(),
                                         registration.transform.GetInverse()])
    return _array(sitk.Resample(scan, scan, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def deformation_change(prepared: PreparedScan, rec: np.ndarray, change: np.ndarray, mask: np.ndarray,
                       deformation: GridDeformation | None = None, inset_mm: float = 0.0,
                       residual: str = "upsampled") -> np.ndarray:
    """A registered scan's change (its grid, its units) when the model's ``change`` of the reconstruction
    ``rec`` (model grid, window units) is realised as a deformation plus residual (module docstring):
    ``deformation`` where the model decided one (:func:`model_deformation`), else one fitted to the change;
    the residual carried as ``residual`` says (:func:`carry_change`, onto the warped scan)."""
    cf = rec + change * mask
    if deformation is None:
        deformation = fit_deformation(rec, cf, prepared.prep.grid_affine, mask, inset_mm=inset_mm)
    rest = (cf - deformation.warp_grid(rec)) * mask
    moved = deform_scan(prepared.registration, deformation)
    return moved - prepared.scan.data + carry_change(prepared, rest, residual, scan=moved)


def jacobian_determinant(deformation: GridDeformation) -> np.ndarray:
    """det(I + grad u) on the model grid: > 0 everywhere means the deformation folds nowhere."""
    import SimpleITK as sitk

    return _array(sitk.DisplacementFieldJacobianDeterminant(sitk.Cast(deformation.field, sitk.sitkVectorFloat64)))


class AnatomicalRealisation:
    """The volumes the causal model decides, realised on the scan's own anatomy (:mod:`pipelines.anatomy`).

    ``"ventricles"``: the subject's ventricles grown by the model's ventricle-volume change
    (:class:`pipelines.anatomy.VentriclePush`), measured on the scan with the rest of the model's change (its
    intensity change, on the scan's tissue, everywhere but within ``wall_mm`` of the ventricles' wall, where
    the change is the push's). ``"volumes"``: the same, with that intensity change scaled where brain meets
    CSF so that the brain volume measured on the output changes by the model's brain-volume change (the push's
    compression of the tissue around the ventricles included): both volumes as the graph decides them.
    Scaled everywhere instead, the change cost half as much again in image error
    (docs/design-notes.md, "The push as a realisation of the model"). A 6 mm change carries only
    part of a volume change onto a 2 mm scan, even the true change does
    (`benchmarks/results/brain_ventricle_realisation_32_*.json`); what each realisation gains in volumes and
    costs in image error is in `benchmarks/results/brain_native.json`.

    The scale (``intensity_scale`` in the details: of the change where brain meets CSF) is found in
    [0, ``max_scale``]; where no scale in it gives the model's brain change (its
    intensity change moves brain volume the other way, or too little), the nearer end is kept and the details
    say so (``brain_volume_change_reached``)."""

    def __init__(self, reference, prep, mask: np.ndarray, scale_to_brain_volume: bool = False,
                 wall_mm: float = 4.0, max_scale: float = 8.0):
        from .anatomy import VentriclePush, reference_levels

        self.levels = reference_levels(reference)
        extent = float(prep.spacing_mm[0]) * int(prep.spatial_size[0])
        self.push = VentriclePush(reference, extent, self.levels.grey_share)
        self.mask, self.scale_to_brain_volume, self.wall_mm, self.max_scale = mask, scale_to_brain_volume, wall_mm, max_scale

    def scan_levels(self, prepared):
        """The scan's CSF, grey- and white-matter intensities (its units): CSF and white matter read through
        the registration, grey matter where the reference's lies between them."""
        from .anatomy import TissueLevels

        lo, hi = prepared.window
        csf, white = (lo + v * (hi - lo) for v in self.push.levels(prepared))
        return TissueLevels(csf, csf + self.levels.grey_share * (white - csf), white)

    def __call__(self, prepared: PreparedScan, change: np.ndarray, delta_brain_ml: float,
                 delta_ventricles_ml: float, residual: str = "tissue") -> tuple[np.ndarray, dict]:
        """The scan's change (its grid, its units) for the model's ``change`` on its grid (window units) and
        its volume changes (ml of the scan), with what was done."""
        from scipy.ndimage import gaussian_filter
        from scipy.optimize import brentq

        from .anatomy import brain_volume_ml

        scan = prepared.scan.data
        intensity = carry_change(prepared, change.reshape(self.mask.shape) * self.mask, residual)
        intensity *= 1.0 - self.push.wall(prepared, self.wall_mm)
        if delta_ventricles_ml:
            phi = self.push.deformation(prepared, delta_ventricles_ml, scan + intensity)
            pushed = deform_scan(prepared.registration, phi)
            intensity = deform_scan(prepared.registration, phi, intensity)
        else:
            pushed = scan
        details = {"ventricle_volume_change_ml": float(delta_ventricles_ml),
                   "brain_volume_change_ml": float(delta_brain_ml), "intensity_scale": 1.0}
        if self.scale_to_brain_volume:
            head = prepared.registration.carry_back(self.mask.astype(np.float32), prepared.prep.grid_affine) > 0.5
            levels = self.scan_levels(prepared)
            voxel_ml = float(np.prod(prepared.scan.spacing)) / 1000.0
            target = brain_volume_ml(scan, head, levels, voxel_ml) + delta_brain_ml

            # scaled where brain meets CSF (a voxel of partial volume, or beside one): there a change of intensity
            # is a change of brain volume, where atrophy happens; elsewhere the change stays as the model made it
            f = levels.brain_fraction(pushed)
            border = np.clip(gaussian_filter(((f > 0.02) & (f < 0.98)).astype(np.float32), 1.0), 0.0, 1.0)

            def scaled(k: float) -> np.ndarray:
                return pushed + intensity * (1.0 + (k - 1.0) * border)

            def excess(k: float) -> float:
                return brain_volume_ml(scaled(k), head, levels, voxel_ml) - target

            ends = excess(0.0), excess(self.max_scale)
            if ends[0] * ends[1] < 0:
                details["intensity_scale"] = round(float(brentq(excess, 0.0, self.max_scale, xtol=1e-3)), 4)
            else:
                details["intensity_scale"] = 0.0 if abs(ends[0]) <= abs(ends[1]) else self.max_scale
                details["brain_volume_change_reached"] = False
        out = scaled(details["intensity_scale"]) if self.scale_to_brain_volume else pushed + intensity
        details["ventricle_volume_change_measured_ml"] = round(self.push.volume_ml(prepared, out)
                                                               - self.push.volume_ml(prepared), 2)
        return out - scan, details
