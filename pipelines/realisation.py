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

- ``"ventricles"``, ``"volumes"`` and ``"atrophy"`` (:class:`pipelines.anatomy.AnatomicalRealisation`): the volumes
  the causal model decides put on the subject's own anatomy. ``"atrophy"``: the model's intensity change around the
  ventricles and half of it elsewhere, the rest of its brain-volume change made on the subject's own cortex (tissue
  turned into CSF where CSF is near, or the reverse). ``"ventricles"``: its ventricles pushed to the model's
  ventricle-volume change and its intensity change elsewhere; ``"volumes"``: the push, the rest as ``"atrophy"``.

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

__all__ = ["REALISATIONS", "RESIDUALS", "GridDeformation", "onto_tissue", "carry_change", "fit_deformation", "model_deformation", "deform_scan",
           "deformation_change", "jacobian_determinant"]

log = logging.getLogger("cdae_med")

REALISATIONS = ("intensity", "deformation", "ventricles", "volumes", "atrophy")
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


def deform_scan(registration: Registration, deformation: GridDeformation, data: np.ndarray | None = None,
                within: np.ndarray | None = None) -> np.ndarray:
    """The scan (or ``data``, another volume on its grid), at its own resolution, warped by a deformation
    found in reference space: a scan point p samples the scan at T(T^-1(p) + u(T^-1(p))), with T the
    registration (reference -> scan). Linear in the data. ``within`` (bool, the scan's grid): only the box
    around it is warped and the rest left as it was, for a measurement confined to it (a solver's many
    evaluations on a 1 mm scan)."""
    import SimpleITK as sitk

    data = registration.scan.data if data is None else np.asarray(data, np.float32)
    scan = to_sitk(data, registration.scan.affine)
    # SimpleITK's composite transform applies its last transform first
    composite = sitk.CompositeTransform([registration.transform, deformation.transform(),
                                         registration.transform.GetInverse()])
    if within is None or not np.any(within):
        return _array(sitk.Resample(scan, scan, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(within))
    out = np.array(data, np.float32)
    out[box] = _array(sitk.Resample(scan, scan[box], composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return out


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

