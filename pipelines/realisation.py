"""How the change a registered model decides on its grid reaches the scan at the scan's resolution.

The model gives, on its grid in reference space, the factual reconstruction ``rec`` and the
counterfactual ``cf`` (window units). Two ways to put their difference onto the patient's scan:

- ``"intensity"``: ``scan + carry_back(cf - rec)``, the difference upsampled through the inverse
  registration. Simple, exact for a null intervention, but a 6 mm change is a blurred one at 2 mm.
- ``"deformation"``: anatomy changes by moving tissue, so the change is first explained as a smooth,
  invertible deformation of ``rec`` onto ``cf`` (SimpleITK's diffeomorphic demons on the model grid,
  Vercauteren et al. 2009), which then warps the *scan itself* at its own resolution (its edges stay
  sharp and move); what the deformation does not explain (tissue turning into CSF) is added as the
  upsampled intensity residual ``cf - rec o phi``. The deformation is confined to the reference's head.

Which measures better is in ``benchmarks/results/brain_native.json`` (per realisation, with the oracle).
"""

from __future__ import annotations

import numpy as np

from .mri import PreparedScan, restore_change
from .registration import Registration, _array, to_sitk

__all__ = ["REALISATIONS", "GridDeformation", "fit_deformation", "deform_scan", "deformation_change",
           "jacobian_determinant"]

REALISATIONS = ("intensity", "deformation")


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
                    iterations: int = 40, smoothing_voxels: float = 1.0) -> GridDeformation:
    """The diffeomorphic-demons deformation that carries ``rec`` onto ``cf`` (both on the model grid),
    multiplied by the (smoothed) head ``mask`` so that nothing outside the head moves."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing_voxels)  # in voxels: the filter smooths on the image grid
    demons.SetSmoothDisplacementField(True)
    field = demons.Execute(to_sitk(cf.astype(np.float32), grid_affine), to_sitk(rec.astype(np.float32), grid_affine))
    weight = np.clip(gaussian_filter(mask.astype(np.float32), 1.0), 0, 1)
    u = sitk.GetArrayFromImage(field) * weight.transpose(2, 1, 0)[..., None]
    out = sitk.GetImageFromArray(u, isVector=True)
    out.CopyInformation(field)
    return GridDeformation(out, grid_affine)


def deform_scan(registration: Registration, deformation: GridDeformation) -> np.ndarray:
    """The scan, at its own resolution, warped by a deformation found in reference space: a scan
    point p samples the scan at T(T^-1(p) + u(T^-1(p))), with T the registration (reference -> scan)."""
    import SimpleITK as sitk

    scan = to_sitk(registration.scan.data, registration.scan.affine)
    # SimpleITK's composite transform applies its last transform first
    composite = sitk.CompositeTransform([registration.transform, deformation.transform(),
                                         registration.transform.GetInverse()])
    return _array(sitk.Resample(scan, scan, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def deformation_change(prepared: PreparedScan, rec: np.ndarray, change: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A registered scan's change (its grid, its units) when the model's ``change`` of the reconstruction
    ``rec`` (model grid, window units) is realised as a deformation plus residual (module docstring)."""
    cf = rec + change * mask
    deformation = fit_deformation(rec, cf, prepared.prep.grid_affine, mask)
    residual = (cf - deformation.warp_grid(rec)) * mask
    return deform_scan(prepared.registration, deformation) - prepared.scan.data + restore_change(prepared, residual)


def jacobian_determinant(deformation: GridDeformation) -> np.ndarray:
    """det(I + grad u) on the model grid: > 0 everywhere means the deformation folds nowhere."""
    import SimpleITK as sitk

    return _array(sitk.DisplacementFieldJacobianDeterminant(sitk.Cast(deformation.field, sitk.sitkVectorFloat64)))
