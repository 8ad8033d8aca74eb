"""The networks of a CausalDiffAE whose diffusion runs in a linear latent space.

A 32^3 volume UNet takes seconds per step on a CPU and, after half an hour, draws a change no
closer to the truth than the untouched scan (``benchmarks/results/brain_native.json``). Registered
brains, though, vary mostly along few directions: 64 principal components hold 87 % of the
variance of registered 32^3 subjects, and the generator's true counterfactual change projected on
them still beats copying the input by a wide margin (``benchmarks/results/brain_latent.json``).
So, as latent diffusion does with its autoencoder (Rombach et al. 2022), the diffusion model runs
in a small space that a fixed first stage maps to and from the image:

- :class:`LinearAutoencoder`: the first stage, whitened principal components of the training
  images (fitted once, with scikit-learn's PCA, before training; buffers, not trained). Voxels that
  never vary over the training set (outside a registered reference's head) keep their value.
- :class:`VoxelQuantiles`: an optional front of the linear first stage: every voxel's intensity to its
  normal score under the training set's distribution at that voxel. Principal components and diffusion
  then run on scores, and a shift of score that is much the same for every subject (what a conditional
  diffusion on a near-Gaussian code gives: docs/design-notes.md, "What limits the brain model") becomes,
  through each voxel's quantiles, a change of intensity that is the subject's own: large where the
  subject's voxel sits between the cohort's tissue modes (a partial-volume voxel turning to CSF), small
  on a mode (deep white matter stays white). It is a monotone flow per voxel, as DDIM abduction is one
  per image.
- :class:`DeformationAutoencoder`: a first stage of shape and appearance. Anatomy changes by moving
  tissue, and a voxelwise linear model of the *displacement* from the cohort's mean image beats one of
  intensity on two of three brain interventions (``benchmarks/results/brain_native.json``), while 64
  principal components of those displacements lose almost nothing of a true counterfactual
  (``benchmarks/results/brain_shape_space.json``). So an image is coded as the diffeomorphic-demons
  displacement v that carries the template onto it (x(p) ~ template(p + v(p))) plus the intensity
  residual the displacement leaves, each as whitened principal components; the decoded change of v is
  the deformation the counterfactual applies to the scan (``pipelines.realisation``).
- :class:`VectorEncoder`: q(u | c) from the coefficients c, an MLP with the two heads of the image
  encoder (mean and log-variance, (B, n, d)).
- :class:`VectorDenoiser`: the denoiser's output for (c_t, t, z): residual MLP blocks, each
  LayerNorm then a scale and a shift by the (t, z) embedding, the scale-shift conditioning that
  measured best for the UNet (``benchmarks/results/recipes.md``).

The causal layer, the label prior and the losses are the CausalDiffAE's (:mod:`cdae_med.model`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["VoxelQuantiles", "LinearAutoencoder", "DeformationAutoencoder", "demons_displacement", "VectorEncoder",
           "VectorDenoiser"]


class _FittedBuffer(nn.Module):
    """A module whose ``fit`` sets the buffer named ``FITTED``, empty along its last dimension until then: it
    is fitted once that dimension is not empty, and a saved one loads with the saved shape and type (its
    size and precision are the fit's; float32 in checkpoints from before bases were stored in half)."""

    FITTED = ""

    @property
    def fitted(self) -> bool:
        return getattr(self, self.FITTED).shape[-1] > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + self.FITTED
        if key in state_dict:
            setattr(self, self.FITTED, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VoxelQuantiles(_FittedBuffer):
    """x (B, V) <-> normal scores (B, V): each voxel's value through the ``n`` quantiles of the training
    values at that voxel (levels 0, 1/(n-1), ..., 1, linearly interpolated), then the standard normal's
    quantile function, as scikit-learn's ``QuantileTransformer(output_distribution="normal")`` does
    column by column (here vectorised over voxels, in torch, so that it is a checkpoint's buffer). A value
    on a run of equal quantiles (a voxel that is background in most subjects) gets the run's middle level;
    scores are kept within the normal's 1e-3 and 1 - 1e-3 quantiles, and a score decodes to a value within
    the training range. ``fit`` sets the buffer; an unfitted one refuses to run."""

    EPS = 1e-3
    FITTED = "quantiles"

    def __init__(self, n: int, voxels: int):
        super().__init__()
        if n < 2:
            raise ValueError(f"a quantile transform needs at least 2 quantiles, got {n}")
        self.n = n
        self.register_buffer("quantiles", torch.zeros(voxels, 0))  # (V, n), sorted along the last dimension

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "VoxelQuantiles":
        """The quantiles of ``x`` (N, V) at every voxel; stored in half precision (as the principal
        components: a voxel's intensity is known to far less than 5e-4 of its range)."""
        s = x.float().sort(0).values
        pos = torch.linspace(0, len(s) - 1, self.n)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=len(s) - 1)
        frac = (pos - lo)[:, None]
        self.quantiles = (s[lo] * (1 - frac) + s[hi] * frac).T.contiguous().half()
        return self

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("the voxel quantiles have not been fitted (VoxelQuantiles.fit)")

    def _level(self, q: torch.Tensor, v: torch.Tensor, right: bool) -> torch.Tensor:
        """Fractional quantile index of values ``v`` (V, B) in ``q`` (V, n), from the left or the right
        end of a run of equal quantiles."""
        i = torch.searchsorted(q, v, right=right).clamp(1, self.n - 1)
        q0, q1 = q.gather(1, i - 1), q.gather(1, i)
        width = q1 - q0
        frac = torch.where(width > 0, (v - q0) / width.clamp_min(1e-12), 0.0 if right else 1.0)
        return i - 1 + frac.clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check()
        q = self.quantiles.float()
        v = torch.maximum(torch.minimum(x.float().T.contiguous(), q[:, -1:]), q[:, :1])
        level = (self._level(q, v, right=False) + self._level(q, v, right=True)) / 2 / (self.n - 1)
        return torch.special.ndtri(level.clamp(self.EPS, 1 - self.EPS)).T.to(x.dtype)

    def inverse(self, scores: torch.Tensor) -> torch.Tensor:
        self._check()
        q = self.quantiles.float()
        pos = torch.special.ndtr(scores.float().T.clamp(-6, 6)) * (self.n - 1)
        lo = pos.floor().long().clamp(0, self.n - 2)
        frac = (pos - lo).clamp(0, 1)
        return (q.gather(1, lo) * (1 - frac) + q.gather(1, lo + 1) * frac).T.contiguous().to(scores.dtype)


class LinearAutoencoder(_FittedBuffer):
    """x (B, *shape) <-> c (B, k): c = (s(x) - mean)[varying] W^T / scale, s(x) = mean + (c scale) W on the
    varying voxels; s is the identity, or with ``quantiles`` > 0 the voxels' normal scores
    (:class:`VoxelQuantiles`, decoded back to intensity). ``fit`` sets the buffers; an unfitted one
    refuses to run."""

    FITTED = "components"

    def __init__(self, k: int, shape: tuple[int, ...], quantiles: int = 0):
        super().__init__()
        self.k, self.shape = k, tuple(shape)
        n = math.prod(self.shape)
        self.scores = VoxelQuantiles(quantiles, n) if quantiles else None
        self.register_buffer("mean", torch.zeros(n))
        # 1.0 where the training images vary; float, not bool, so that a weight average over
        # buffers (torch.optim.swa_utils.AveragedModel) leaves it as it is
        self.register_buffer("varying", torch.zeros(n))
        self.register_buffer("components", torch.zeros(k, 0))
        self.register_buffer("scale", torch.ones(k))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None,
            labelled: torch.Tensor | None = None) -> float:
        """Principal components of ``images`` (N, *shape); returns the share of variance the code holds.

        ``labels`` (N, m): the first components are instead the directions along which the images move with
        the labels (the least-squares slope of every voxel on them, over the ``labelled`` rows, orthonormalised),
        and the others the principal components of what those leave, so a linear regression in the code is the
        voxelwise regression itself rather than its projection on the directions of most variance. It is for a
        first stage whose principal components miss the labels' directions; the brain's do not
        (``benchmarks/results/brain_native_evaluations/label_directions_validation.json``)."""
        from sklearn.decomposition import PCA

        x = images.reshape(len(images), -1).float()
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"images of {tuple(images.shape[1:])} voxels for a first stage of shape {self.shape}")
        if len(x) <= self.k:
            raise ValueError(f"{self.k} principal components need more than {self.k} training images, got {len(x)}")
        if self.scores is not None:
            x = self.scores.fit(x)(x)
        mean = x.mean(0)
        varying = (x - mean).abs().amax(0) > 1e-6
        d = x[:, varying] - mean[varying]
        directions = torch.zeros(0, d.shape[1])
        if labels is not None:
            directions = self._label_directions(d, labels, labelled)
            d = d - (d @ directions.T) @ directions
        pca = PCA(self.k - len(directions), whiten=True, random_state=seed).fit(d.numpy())
        self.mean = mean
        self.varying = varying.float()
        # Stored in half precision: the basis is most of a checkpoint's size (a shipped model is package data),
        # and its rounding (about 5e-4 of a unit vector's entries) is far below any model's error.
        self.components = torch.cat([directions, torch.as_tensor(pca.components_, dtype=torch.float32)]).half()
        along = ((x[:, varying] - mean[varying]) @ directions.T).var(0) if len(directions) else torch.zeros(0)
        residual = torch.tensor(pca.explained_variance_, dtype=torch.float32)
        self.scale = torch.cat([along, residual]).sqrt()
        return float((along.sum() + residual.sum()) / (x[:, varying] - mean[varying]).var(0).sum())

    def _label_directions(self, d: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None) -> torch.Tensor:
        """(r, V) orthonormal rows spanning the voxels' least-squares slopes on ``labels`` (centred data ``d``)."""
        y = labels.float()
        if len(y) != len(d):
            raise ValueError(f"{len(y)} label rows for {len(d)} training images")
        rows = torch.ones(len(y), dtype=torch.bool) if labelled is None else labelled.bool()
        y, dl = y[rows] - y[rows].mean(0), d[rows] - d[rows].mean(0)
        slopes = torch.linalg.lstsq(y.double(), dl.double()).solution.float()  # (m, V)
        q, r = torch.linalg.qr(slopes.T)
        keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().amax().clamp_min(1e-12)
        if int(keep.sum()) >= self.k:
            raise ValueError(f"{self.k} components cannot hold {int(keep.sum())} label directions and a residual")
        return q[:, keep].T.contiguous()

    def fit_transform(self, images: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None,
                      labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """:meth:`fit`, then the images' coefficients (as scikit-learn's ``fit_transform``)."""
        share = self.fit(images, seed, labels, labelled)
        return torch.cat([self.encode(images[i:i + 256]) for i in range(0, len(images), 256)]), share

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("the linear first stage has not been fitted (LinearAutoencoder.fit)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check()
        x = x.reshape(len(x), -1).to(self.mean.dtype)
        d = (x if self.scores is None else self.scores(x)) - self.mean
        return d[:, self.varying.bool()] @ self.components.T.to(d.dtype) / self.scale

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        self._check()
        out = self.mean.expand(len(c), -1).clone()
        out[:, self.varying.bool()] += (c.to(self.scale.dtype) * self.scale) @ self.components.to(self.scale.dtype)
        if self.scores is not None:
            out = self.scores.inverse(out)
        return out.view(len(c), *self.shape)

    def change(self, x: torch.Tensor, c: torch.Tensor, c_cf: torch.Tensor) -> torch.Tensor:
        """The change of images ``x`` (B, *shape) when their code moves from ``c`` to ``c_cf``, taken at the
        images' own values rather than at their decoding: the decoded difference, which for a first stage
        on scores shifts each voxel's own score, s(x) + (s(c_cf) - s(c)), and decodes that, less the
        image's own decoding so that an unchanged code changes nothing, bit for bit."""
        self._check()
        delta = torch.zeros(len(c), self.mean.numel(), dtype=self.scale.dtype, device=c.device)
        step = (c_cf - c).to(self.scale.dtype) * self.scale
        delta[:, self.varying.bool()] = step @ self.components.to(self.scale.dtype)
        if self.scores is None:
            return delta.view(len(c), *self.shape)
        s = self.scores(x.reshape(len(x), -1).to(self.scale.dtype))
        return (self.scores.inverse(s + delta) - self.scores.inverse(s)).view(len(c), *self.shape)


class VoxelSpread(_FittedBuffer):
    """Every voxel's intensity about its mean given the graph's values: x = mu(y) + sigma(r) e, mu linear in
    [1, y] (all the graph's normalised values) and log sigma^2 linear in [1, r] (its root variables' only),
    fitted by least squares, the log-variance on the log squared residuals. A counterfactual keeps a subject's e, so its
    deviation from mu(y) at a voxel is scaled by sigma(r') / sigma(r): where the spread grows with age
    (atrophy spreading), a subject far from the cohort's mean moves further than one near it, which a code
    Gaussian about a mean linear in z (the latent denoiser's linear path) cannot do. The spread depends on the
    roots alone because the slopes of correlated descendants (brain volume with age) are not identified: with
    every variable in it a brain model lost under do(brain_volume) what it gained under do(age) (design notes,
    "A spread that moves with age"). The ratio is held within e^(+-1): a voxel with almost no spread has no
    reliable slope of it."""

    FITTED = "mean"

    def __init__(self, n_vars: int, roots: Sequence[int], shape: tuple[int, ...]):
        super().__init__()
        self.roots, self.shape = tuple(int(r) for r in roots), tuple(shape)
        if not self.roots or not all(0 <= r < n_vars for r in self.roots):
            raise ValueError(f"a voxel spread needs root variables among the {n_vars}, got {self.roots}")
        self.register_buffer("mean", torch.zeros(1 + n_vars, 0))
        self.register_buffer("log_var", torch.zeros(1 + len(self.roots), 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "log_var" in state_dict:
            self.log_var = torch.empty_like(state_dict[prefix + "log_var"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _designs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = torch.cat([y.new_ones(len(y), 1), y], 1)
        return full, full[:, [0, *(1 + r for r in self.roots)]]

    @torch.no_grad()
    def fit(self, images: torch.Tensor, y_norm: torch.Tensor, eps: float = 4e-6) -> "VoxelSpread":
        """``images`` (N, *shape) in [-1, 1], ``y_norm`` (N, n_vars) their normalised values."""
        flat = images.reshape(len(images), -1).double()
        if flat.shape[1] != math.prod(self.shape):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} for a spread of {self.shape}")
        full, roots = self._designs(y_norm.double())
        mean = torch.linalg.lstsq(full, flat).solution
        log_var = torch.linalg.lstsq(roots, torch.log((flat - full @ mean) ** 2 + eps)).solution
        self.mean, self.log_var = mean.float(), log_var.float()
        return self

    @torch.no_grad()
    def change(self, x: torch.Tensor, y_norm: torch.Tensor, y_cf_norm: torch.Tensor) -> torch.Tensor:
        """(ratio - 1) (x - mu(y)): what the spread adds to the counterfactual of ``x`` (B, *shape) in [-1, 1]
        from values ``y_norm`` to ``y_cf_norm`` (B, n_vars). Exactly zero where the roots do not change."""
        if not self.fitted:
            raise RuntimeError("the voxel spread has not been fitted (VoxelSpread.fit)")
        full, roots = self._designs(y_norm.float())
        _, roots_cf = self._designs(y_cf_norm.float())
        ratio = torch.exp((0.5 * (roots_cf - roots) @ self.log_var).clamp(-1, 1))
        flat = x.reshape(len(x), -1).float()
        return ((ratio - 1) * (flat - full @ self.mean)).reshape(x.shape).to(x.dtype)


def demons_displacement(fixed: torch.Tensor, moving: torch.Tensor, iterations: int = 40,
                        smoothing_voxels: float = 1.0) -> torch.Tensor:
    """The displacement v (spatial_dims, *spatial), in voxels along the array's axes, with which
    ``moving`` sampled at p + v(p) matches ``fixed`` (both (*spatial)): SimpleITK's diffeomorphic demons
    (Vercauteren et al. 2009) on the voxel grid."""
    return torch.from_numpy(_demons(fixed.detach().cpu().float().numpy(), moving.detach().cpu().float().numpy(),
                                    iterations, smoothing_voxels))


def _demons(fixed: np.ndarray, moving: np.ndarray, iterations: int, smoothing_voxels: float) -> np.ndarray:
    import SimpleITK as sitk

    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing_voxels)
    demons.SetSmoothDisplacementField(True)
    field = demons.Execute(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving))
    # SimpleITK reads a numpy array's axes in reverse and so orders a vector's components the other way
    return np.moveaxis(sitk.GetArrayFromImage(field)[..., ::-1], -1, 0).astype(np.float32)


def _demons_chunk(images: np.ndarray, template: np.ndarray, iterations: int, smoothing_voxels: float) -> np.ndarray:
    """One pool task: single-threaded demons of each image from the template (pool processes are forked
    and need numpy and SimpleITK only, not torch's thread pool)."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    return np.stack([_demons(im, template, iterations, smoothing_voxels) for im in images])


class DeformationAutoencoder(nn.Module):
    """x (B, 1, *shape) <-> c (B, k_shape + k_residual): the first ``k_shape`` coefficients are the whitened
    principal components of the displacement v that carries ``template`` onto x (:func:`demons_displacement`,
    voxels), the others those of the residual x - template o v. ``fit`` sets the buffers (the template is the
    training images' mean); encoding runs demons, so a training set is encoded once, not per step."""

    def __init__(self, k_shape: int, k_residual: int, shape: tuple[int, ...], iterations: int = 40,
                 smoothing_voxels: float = 1.0):
        super().__init__()
        from monai.networks.blocks import Warp

        if shape[0] != 1:
            raise ValueError(f"a deformation first stage takes one channel, got shape {tuple(shape)}")
        self.k_shape, self.k_residual, self.shape = k_shape, k_residual, tuple(shape)
        self.k = k_shape + k_residual
        self.iterations, self.smoothing_voxels = iterations, smoothing_voxels
        spatial = self.shape[1:]
        self.register_buffer("template", torch.zeros(self.shape))
        # Where a displacement is kept: the voxels any training image shows something in, grown by two voxels
        # (a registered subject is background outside its reference's head, so nothing there needs moving);
        # it keeps the shape components' basis to the head.
        self.register_buffer("support", torch.ones((1, *spatial)))
        self.displacements = LinearAutoencoder(k_shape, (len(spatial), *spatial))
        self.residuals = LinearAutoencoder(k_residual, self.shape)
        with warnings.catch_warnings():  # MONAI notes that it uses torch's grid_sample, which is what we want
            warnings.simplefilter("ignore")
            self.warp = Warp(mode="bilinear", padding_mode="border")

    @property
    def fitted(self) -> bool:
        return self.displacements.fitted and self.residuals.fitted

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        """(B, spatial_dims, *spatial): each image's displacement from the template. Many images are
        registered by a pool of one process per torch thread, which demons at 32^3 uses better than
        SimpleITK's own threads do."""
        images = x[:, 0].detach().cpu().float().numpy()
        template = self.template[0].detach().cpu().float().numpy()
        settings = (self.iterations, self.smoothing_voxels)
        workers = min(torch.get_num_threads(), len(images) // 16)
        if workers < 2:
            return torch.from_numpy(_demons_chunk(images, template, *settings)).to(self.template.device)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        chunks = [images[i:i + 16] for i in range(0, len(images), 16)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            fields = list(pool.map(_demons_chunk, chunks, *([c] * len(chunks) for c in (template, *settings))))
        return torch.from_numpy(np.concatenate(fields)).to(self.template.device)

    def warped(self, v: torch.Tensor) -> torch.Tensor:
        return self.warp(self.template.expand(len(v), *self.shape).to(v.dtype), v)

    @torch.no_grad()
    def fit_transform(self, images: torch.Tensor, seed: int = 0, fields: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None,
                      labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Template, then the principal components of the displacements, then those of the residuals
        after the projected displacement; returns the images' coefficients and the share of the images'
        variance the code holds. ``fields``: the images' displacements from their mean, where computed
        before (:meth:`fields` of a first stage whose template is ``images.mean(0)``). ``labels``,
        ``labelled``: each part's first components are the labels' directions (:meth:`LinearAutoencoder.fit`)."""
        x = images.float()
        self.template = x.mean(0)
        shows = (x > x.amin() + 1e-6).any(0).float()
        pool = nn.functional.max_pool3d if len(self.shape) == 4 else nn.functional.max_pool2d
        self.support = pool(shows[None], 5, 1, 2)[0]
        v = (self.fields(x) if fields is None else fields.to(self.template)) * self.support
        self.displacements.fit(v, seed, labels, labelled)
        residual = x - self.warped(self.displacements.decode(self.displacements.encode(v)))
        self.residuals.fit(residual, seed, labels, labelled)
        codes = self.encode_fields(x, v)
        err = x - self.decode(codes)
        return codes, float(1 - err.var(0).sum() / x.var(0).sum())

    def fit(self, images: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None,
            labelled: torch.Tensor | None = None) -> float:
        return self.fit_transform(images, seed, labels=labels, labelled=labelled)[1]

    def encode_fields(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cs = self.displacements.encode(v)
        return torch.cat([cs, self.residuals.encode(x - self.warped(self.displacements.decode(cs)))], 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("the deformation first stage has not been fitted (DeformationAutoencoder.fit)")
        return self.encode_fields(x, self.fields(x) * self.support)

    def displacement(self, c: torch.Tensor) -> torch.Tensor:
        """The decoded displacement (B, spatial_dims, *spatial) of coefficients ``c``."""
        return self.displacements.decode(c[:, :self.k_shape])

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return self.warped(self.displacement(c)) + self.residuals.decode(c[:, self.k_shape:])


class VectorEncoder(nn.Module):
    """c (B, k) -> (mean, log-variance) of q(u | c), (B, n_vars, latent_dim) each."""

    def __init__(self, k: int, n_vars: int, latent_dim: int, hidden: int):
        super().__init__()
        self.n_vars, self.latent_dim = n_vars, latent_dim
        self.net = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * n_vars * latent_dim))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(c).view(len(c), 2, self.n_vars, self.latent_dim)
        return h[:, 0], h[:, 1].clamp(-10.0, 5.0)


class VectorDenoiser(nn.Module):
    """The denoiser's output for c_t (B, k) at t (B,) under the condition (B, cond_features + 1) whose last
    column is the keep flag (0: a learned null condition, the unconditional model).

    ``linear_path``: beside the MLP, a(t) * c_t + b(t) * (W z + w): the exact denoiser of a code that is
    Gaussian about a mean linear in z (a(t), b(t) per component, read from the time embedding), so that what
    a voxelwise regression finds in a few thousand subjects is the model's starting point rather than
    something its MLP has to find; the MLP learns what departs from it. Zero at initialisation.

    ``mlp=False`` (with ``linear_path``): the linear path alone, the denoiser of that Gaussian and nothing
    else. Its probability-flow map from p(c | z) to p(c | z') moves every code by W (z' - z): all that a code
    near Gaussian given the labels needs, with no MLP to overfit a small cohort (docs/design-notes.md, "The
    latent denoiser's linear path alone")."""

    def __init__(self, k: int, cond_features: int, hidden: int, depth: int, linear_path: bool = False,
                 mlp: bool = True):
        super().__init__()
        if not (mlp or linear_path):
            raise ValueError("a latent denoiser needs its MLP, its linear path or both")
        self.linear_path, self.mlp = linear_path, mlp
        if linear_path:
            self.gate_c, self.gate_z = nn.Linear(hidden, k), nn.Linear(hidden, k)
            for gate in (self.gate_c, self.gate_z):
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
            self.mean = nn.Linear(cond_features, k)
        self.time = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if mlp:
            self.inp = nn.Linear(k, hidden)
            self.cond = nn.Sequential(nn.Linear(cond_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.null = nn.Parameter(torch.zeros(hidden))
            self.norms = nn.ModuleList(nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(depth))
            self.scale_shift = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(depth))
            self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                      for _ in range(depth))
            self.out = nn.Linear(hidden, k)
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(32) / 32), persistent=False)

    def forward(self, c_t: torch.Tensor, t: torch.Tensor, cond_and_keep: torch.Tensor) -> torch.Tensor:
        a = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        cond, keep = cond_and_keep[:, :-1], cond_and_keep[:, -1:]
        time = self.time(torch.cat([a.sin(), a.cos()], 1))
        out = 0
        if self.mlp:
            e = nn.functional.silu(time + keep * self.cond(cond) + (1 - keep) * self.null)
            h = self.inp(c_t)
            for norm, ss, mlp in zip(self.norms, self.scale_shift, self.mlps):
                scale, shift = ss(e).chunk(2, 1)
                h = h + mlp(norm(h) * (1 + scale) + shift)
            out = self.out(h)
        if not self.linear_path:
            return out
        time = nn.functional.silu(time)
        return out + self.gate_c(time) * c_t + keep * self.gate_z(time) * self.mean(cond)
