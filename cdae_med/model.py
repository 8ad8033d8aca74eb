"""The Causal Diffusion Autoencoder (CausalDiffAE).

    x0 --encoder--> q(u | x0) --causal layer--> z = (z_1 .. z_n) --> denoiser eps(x_t, t, z)

- The encoder is a stack of MONAI strided convolutions with two linear heads (mean and
  log-variance of u), ``spatial_dims`` 2 or 3.
- The causal layer is an additive-noise SCM over latent blocks of ``latent_dim`` each:
  z_i = f_i(z_pa(i)) + u_i (f_i of the parents' whole blocks, or of their values with
  ``mechanism_input = "values"``; see :class:`CausalLayer`), evaluated in topological order from the parents' *z* (the paper's
  public code feeds the parents' u in one pass, so an intervention never reaches descendants).
  Additive noise makes abduction exact: u_i = z_i - f_i(z_pa(i)).
  The mechanisms are fitted by regression on the labels (``mechanism_loss``) and by nothing else:
  the diffusion and KL terms see them frozen, because trained jointly they move only as fast as
  the encoder's u gives way, against a label prior 100x stronger (docs/design-notes.md,
  "Mechanisms"; benchmarks/results/mechanism_fit.json).
- The label prior is p(z_i | y_i) = N(mu(y_i), sigma^2 I) with mu(y) = y * 1 (the normalised
  label written into every dimension of the block, as in the paper's code) and a fixed
  sigma (``prior_std``). A learned mu/sigma could drift to a constant and erase what the block
  means, and the counterfactual step needs mu to *be* the label's latent value.
- The denoiser is MONAI's ``DiffusionModelUNet``. z is mapped by an MLP to the width of the
  timestep embedding and added to it, so the condition reaches every ResBlock (the paper's
  code does the same, through AdaGN); cross-attention alone is ignored by a briefly trained
  model (see FACTS.md).
- MONAI's ResBlock adds the embedding to the features and *then* applies GroupNorm, which
  removes whatever is constant over a group: with one channel per group (32 channels, MONAI's
  default 32 groups) the denoiser cannot read t or z at all. ``unet_norm_groups`` = 8 (at least 4
  channels per group) lets every level read z; the default stays MONAI's 32, which measured
  better on the Pendulum main job (docs/design-notes.md, "GroupNorm"). Networks whose levels are
  all 32 channels wide (the tests' tiny one) need 8.
- ``conditioning`` = "scale_shift" instead feeds the same embedding as a scale and shift of the
  features *after* GroupNorm (h = GN(h) (1 + s) + b), as the paper's AdaGN and DiffAE
  (Preechakul et al. 2022) do, and as diffusers' ``resnet_time_scale_shift="scale_shift"``; a
  scale survives the normalisation at any number of groups.
- Conditioning can be dropped (a learned null embedding) with probability ``cond_drop_prob``
  during training; that gives the unconditional model used for guidance.

Variants (``CausalDiffAEConfig.variant``), trained by the same code with one switch each, so that
the baselines of the paper are measured on equal terms:

- ``"causaldiffae"`` (default): all of the above.
- ``"diffae"``: a diffusion autoencoder (Preechakul et al. 2022): no causal layer (z = u, no
  mechanisms) and no label prior (labels are never used in training; only KL(q(u|x) || N(0, I))
  regularises the code). Its latent blocks carry no assigned meaning, so an intervention writes a
  label value into a block the model never learned to read: that is the point of the baseline.
- ``"label_conditional"``: a label-conditional diffusion model: the denoiser is conditioned on
  z = mu(y), the normalised labels themselves (no exogenous latent, no causal layer, so an
  intervention does not reach descendants). The encoder is trained only as a label reader
  (KL(q(u|x) || p(z|y)), no N(0, I) term) so that abduction works on an image without labels;
  unlabelled samples train the unconditional model (z dropped).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn

from .graph import CausalGraph
from .latent import DeformationAutoencoder, LinearAutoencoder, VectorDenoiser, VectorEncoder, VoxelSpread

__all__ = ["CausalDiffAEConfig", "CausalDiffAE", "CausalLayer", "Encoder", "kl_normal", "VARIANTS"]

VARIANTS = ("causaldiffae", "diffae", "label_conditional")
CONDITIONING = ("add", "scale_shift")
MECHANISM_INPUTS = ("blocks", "values")


@dataclass
class CausalDiffAEConfig:
    spatial_dims: int = 2
    in_channels: int = 3
    image_size: tuple[int, ...] = (32, 32)
    latent_dim: int = 16  # dimensions per causal variable
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_res_blocks: int = 1
    unet_head_channels: int = 32
    unet_norm_groups: int = 32  # see the module docstring: 8 reads z at every level, 32 is MONAI's
    mechanism_hidden: int = 64
    # What each causal mechanism reads of its parents: "blocks" (their whole latent blocks; older checkpoints) or
    # "values" (each parent's value, its block's mean, as read_values reports it). See CausalLayer.
    mechanism_input: str = "blocks"
    prior_std: float = 0.1
    cond_drop_prob: float = 0.1
    # Which model: see the module docstring. Checkpoints written before variants existed lack the
    # field and load as "causaldiffae", which is what they are.
    variant: str = "causaldiffae"
    # How the (t, z) embedding enters each ResBlock (module docstring); older checkpoints are "add".
    conditioning: str = "add"
    # > 0: the diffusion runs on this many principal components of the image, with MLP encoder and
    # denoiser (cdae_med.latent); the UNet and convolution settings above are then unused.
    latent_components: int = 0
    # > 0 (with latent_components > 0): the first stage codes shape and appearance, this many principal
    # components of the displacement from the template beside latent_components of the intensity residual
    # (cdae_med.latent.DeformationAutoencoder); the diffusion runs on both.
    latent_shape_components: int = 0
    # The displacement's smoothness (demons' Gaussian, in voxels of the model grid): a smoother field leaves
    # fine changes (a cortex thinning in place) to the residual and codes only movement (ventricles growing);
    # 2 voxels measured better than 1 on brain validation subjects (docs/design-notes.md, "Shape and appearance").
    latent_shape_smoothing: float = 2.0
    # > 0 (with latent_components > 0 and no shape components): the principal components are those of every
    # voxel's normal score under this many quantiles of the training set's values there
    # (cdae_med.latent.VoxelQuantiles), so the decoded change is the subject's own.
    latent_quantiles: int = 0
    # The first stage's leading components are the directions along which the training images move with the
    # labels, the others principal components of the rest (cdae_med.latent.LinearAutoencoder.fit); older
    # checkpoints lack it and are principal components throughout.
    latent_label_directions: bool = False
    # The latent denoiser's linear path beside its MLP (cdae_med.latent.VectorDenoiser); older checkpoints lack it.
    latent_linear_path: bool = False
    # False (with latent_linear_path): the latent denoiser is its linear path alone, no MLP.
    latent_mlp: bool = True
    latent_hidden: int = 256
    latent_depth: int = 2
    # True (with latent_components): the images' spread about their mean, per voxel, as a function of the graph's
    # root variables (cdae_med.latent.VoxelSpread, fitted in closed form beside the first stage); a
    # counterfactual scales the subject's deviation from that mean by the spread's ratio. Older checkpoints lack it.
    voxel_spread: bool = False
    # > 0: the std (normalised label units) of one Gaussian draw per sample and variable added to every dimension
    # of each block of a variable with parents, in the z the denoiser is trained on. Where a descendant is a
    # function of its parents (Pendulum's shadow), observational images never show them disagree, so nothing
    # stops the denoiser reading the parents' content off the descendant's block; made noisy there, the block is
    # no longer the parents' most reliable source (docs/design-notes.md, "Interventions on descendants").
    descendant_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.mechanism_input not in MECHANISM_INPUTS:
            raise ValueError(f"unknown mechanism_input {self.mechanism_input!r}; available: {', '.join(MECHANISM_INPUTS)}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; available: {', '.join(CONDITIONING)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown model variant {self.variant!r}; available: {', '.join(VARIANTS)}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(f"image_size {self.image_size} does not have {self.spatial_dims} dimensions")
        if self.latent_components < 0 or self.latent_hidden < 1 or self.latent_depth < 1:
            raise ValueError("latent_components must be >= 0, latent_hidden and latent_depth >= 1")
        if not (self.latent_mlp or self.latent_linear_path):
            raise ValueError("latent_mlp=False needs latent_linear_path=True: the latent denoiser would be empty")
        if (self.latent_linear_path or not self.latent_mlp) and not self.latent_components:
            raise ValueError("the latent denoiser (latent_linear_path, latent_mlp) needs latent_components > 0")
        self.latent_shape_smoothing = float(self.latent_shape_smoothing)  # 2 and 2.0 are one setting (a cache key)
        if not 0.0 < self.latent_shape_smoothing <= 10.0:
            raise ValueError(f"latent_shape_smoothing must be in (0, 10] voxels, got {self.latent_shape_smoothing}")
        if self.latent_shape_components < 0 or (self.latent_shape_components and not self.latent_components):
            raise ValueError("latent_shape_components must be >= 0 and needs latent_components > 0 "
                             "(the residual's components)")
        if self.latent_quantiles and (self.latent_quantiles < 2 or not self.latent_components
                                      or self.latent_shape_components):
            raise ValueError("latent_quantiles must be 0 or >= 2 and needs latent_components > 0 and no "
                             f"latent_shape_components, got {self.latent_quantiles}")
        if not 0.0 <= self.descendant_noise <= 10.0:
            raise ValueError(f"descendant_noise must be in [0, 10] normalised units, got {self.descendant_noise}")
        if self.voxel_spread and not self.latent_components:
            raise ValueError("voxel_spread needs latent_components > 0 (a model of a code and the voxels about it)")
        if self.voxel_spread and self.latent_quantiles:
            raise ValueError("voxel_spread does not combine with latent_quantiles: a change of the voxels' scores "
                             "is realised from the code alone (LinearAutoencoder.change)")
        if self.latent_label_directions and not self.latent_components:
            raise ValueError("latent_label_directions needs latent_components > 0 (a first stage to hold them)")
        factor = 2 ** max(len(self.encoder_channels), len(self.unet_channels) - 1)
        if not self.latent_components and any(s % factor for s in self.image_size):
            raise ValueError(f"every image dimension must be a multiple of {factor}, got {self.image_size}")
        self.encoder_channels = tuple(self.encoder_channels)
        self.unet_channels = tuple(self.unet_channels)
        self.unet_attention = tuple(bool(a) for a in self.unet_attention)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not self.latent_components and any(c % self.unet_norm_groups for c in self.unet_channels):
            raise ValueError(f"unet_channels {self.unet_channels} must be multiples of unet_norm_groups "
                             f"({self.unet_norm_groups})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CausalDiffAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        return cls(**data)


class Encoder(nn.Module):
    """x0 -> (mean, log-variance) of q(u | x0), shape (B, n_vars, latent_dim) each."""

    def __init__(self, cfg: CausalDiffAEConfig, n_vars: int):
        super().__init__()
        layers, ch = [], cfg.in_channels
        for out in cfg.encoder_channels:
            layers.append(
                Convolution(
                    cfg.spatial_dims, ch, out, strides=2, kernel_size=3,
                    act=("leakyrelu", {"negative_slope": 0.2}),
                    # GroupNorm, not the paper's BatchNorm: a counterfactual of one image must not
                    # depend on which other images share its batch.
                    norm=("group", {"num_groups": min(8, out)}),
                )
            )
            ch = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = ch * math.prod(s // 2 ** len(cfg.encoder_channels) for s in cfg.image_size)
        self.n_vars, self.latent_dim = n_vars, cfg.latent_dim
        self.heads = nn.Linear(flat, 2 * n_vars * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.heads(self.features(x)).view(x.shape[0], 2, self.n_vars, self.latent_dim)
        return h[:, 0], h[:, 1].clamp(-10.0, 5.0)


class CausalLayer(nn.Module):
    """Additive-noise SCM over latent blocks: z_i = f_i(z_parents) + u_i in topological order.

    ``reads``: what a mechanism sees of its parents. ``"blocks"``: their whole latent blocks. ``"values"``: each
    parent's value, its block's mean. The mechanisms are fitted on labels alone, where every dimension of a block
    is the label (``CausalDiffAE.label_latent``), so a mechanism on whole blocks never learns what to make of
    blocks whose dimensions differ, and the encoder's do (within the label prior's spread); an intervention then
    swaps such a block for an even one, and the child moves by the mechanism's arbitrary answer to that difference
    as well as by the change of value (docs/design-notes.md, "Volumes on a log scale"). Reading values, it moves by
    the change of value alone."""

    def __init__(self, graph: CausalGraph, latent_dim: int, hidden: int, mechanisms: bool = True,
                 reads: str = "blocks"):
        super().__init__()
        if reads not in MECHANISM_INPUTS:
            raise ValueError(f"unknown mechanism input {reads!r}; available: {', '.join(MECHANISM_INPUTS)}")
        self.graph, self.reads = graph, reads
        self.index = {n: i for i, n in enumerate(graph.names)}
        self.mechanisms = nn.ModuleDict()
        per_parent = latent_dim if reads == "blocks" else 1
        # mechanisms=False: z = u, the identity (the baselines without a causal layer).
        for v in graph.variables:
            if v.parents and mechanisms:
                self.mechanisms[v.name] = nn.Sequential(
                    nn.Linear(len(v.parents) * per_parent, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim)
                )

    def mechanism(self, name: str, z_blocks: list[torch.Tensor], frozen: bool = False) -> torch.Tensor:
        """f_name(z_parents). ``frozen``: no gradient reaches the mechanism's weights (it still
        flows to the parents' blocks), for losses that must not move the mechanisms."""
        blocks = [z_blocks[self.index[p]] for p in self.graph[name].parents]
        if self.reads == "values":
            blocks = [b.mean(-1, keepdim=True) for b in blocks]
        parents = torch.cat(blocks, dim=-1)
        f = self.mechanisms[name]
        if frozen:
            return torch.func.functional_call(f, {k: v.detach() for k, v in f.named_parameters()}, (parents,))
        return f(parents)

    def forward(self, u: torch.Tensor, do: Mapping[str, torch.Tensor] | None = None,
                frozen: bool = False) -> torch.Tensor:
        """u (B, n, d) -> z (B, n, d); ``do`` maps a variable to the latent block it is set to."""
        do = do or {}
        z: list[torch.Tensor] = [u[:, i] for i in range(u.shape[1])]
        for name in self.graph.order:
            i = self.index[name]
            if name in do:
                z[i] = do[name].expand_as(u[:, i])
            elif name in self.mechanisms:
                z[i] = self.mechanism(name, z, frozen) + u[:, i]
        return torch.stack(z, dim=1)

    def abduct(self, z: torch.Tensor) -> torch.Tensor:
        """The exogenous u that produces z: u_i = z_i - f_i(z_parents)."""
        blocks = [z[:, i] for i in range(z.shape[1])]
        u = [
            blocks[i] - self.mechanism(n, blocks) if n in self.mechanisms else blocks[i]
            for i, n in enumerate(self.graph.names)
        ]
        return torch.stack(u, dim=1)


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's diffusion ResBlock with adaptive group normalisation: the embedding gives a scale and
    a shift of the normalised features, h = GN(h) (1 + s) + b, instead of a sum before GN."""

    def __init__(self, spatial_dims: int, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 up: bool = False, down: bool = False, norm_num_groups: int = 32, norm_eps: float = 1e-6):
        super().__init__(spatial_dims, in_channels, temb_channels, out_channels, up, down, norm_num_groups, norm_eps)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * self.out_channels)

    @classmethod
    def like(cls, block: DiffusionUNetResnetBlock) -> "ScaleShiftResnetBlock":
        return cls(block.spatial_dims, block.channels, block.emb_channels, block.out_channels, block.up,
                   block.down, block.norm1.num_groups, block.norm1.eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(self.nonlinearity(emb)).view(
            h.shape[0], 2, self.out_channels, *([1] * self.spatial_dims)).unbind(1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


def use_scale_shift(unet: nn.Module) -> None:
    """Replace every diffusion ResBlock of ``unet`` by a :class:`ScaleShiftResnetBlock` of the same shape."""
    for module in list(unet.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is DiffusionUNetResnetBlock:
                setattr(module, child_name, ScaleShiftResnetBlock.like(child))


class ConditionEmbedding(nn.Module):
    """z (B, n*d + 1) -> embedding added to the UNet's timestep embedding.

    The last column is a keep flag: 0 swaps in a learned null embedding (unconditional model).
    It travels inside the tensor because the UNet passes ``class_labels`` straight here.
    """

    def __init__(self, in_features: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.null = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, z_and_keep: torch.Tensor) -> torch.Tensor:
        z, keep = z_and_keep[:, :-1], z_and_keep[:, -1:]
        return keep * self.mlp(z) + (1 - keep) * self.null


def labelled_mean(each: torch.Tensor, labelled: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-sample term (B, ...) over the samples ``labelled`` (B,) marks; all if None."""
    if labelled is None:
        return each.mean()
    w = labelled.to(each.dtype).view(-1, *([1] * (each.ndim - 1)))
    return (each * w).sum() / (w.sum() * each[0].numel()).clamp_min(1)


def kl_normal(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor | float = 0.0,
              prior_std: float = 1.0) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(prior_mean, prior_std^2)) element-wise."""
    var_ratio = logvar.exp() / prior_std**2
    return 0.5 * (var_ratio + (mean - prior_mean) ** 2 / prior_std**2 - 1 - torch.log(var_ratio))


class CausalDiffAE(nn.Module):
    def __init__(self, graph: CausalGraph, config: CausalDiffAEConfig | None = None):
        super().__init__()
        cfg = config or CausalDiffAEConfig()
        self.graph, self.config = graph, cfg
        n = len(graph)
        self.causal = CausalLayer(graph, cfg.latent_dim, cfg.mechanism_hidden,
                                  mechanisms=cfg.variant == "causaldiffae", reads=cfg.mechanism_input)
        self.first_stage = None
        self.spread = None
        # the blocks noisy_descendants perturbs: variables with parents
        self._descendants = [i for i, name in enumerate(graph.names) if graph.parents_of(name)]
        if cfg.latent_components:
            shape = (cfg.in_channels, *cfg.image_size)
            if cfg.latent_shape_components:
                self.first_stage = DeformationAutoencoder(cfg.latent_shape_components, cfg.latent_components, shape,
                                                          smoothing_voxels=cfg.latent_shape_smoothing)
            else:
                self.first_stage = LinearAutoencoder(cfg.latent_components, shape, cfg.latent_quantiles)
            k = self.first_stage.k
            self.encoder = VectorEncoder(k, n, cfg.latent_dim, cfg.latent_hidden)
            self.denoiser = VectorDenoiser(k, n * cfg.latent_dim, cfg.latent_hidden, cfg.latent_depth,
                                           cfg.latent_linear_path, cfg.latent_mlp)
            if cfg.voxel_spread:
                roots = [i for i, name in enumerate(graph.names) if not graph.parents_of(name)]
                self.spread = VoxelSpread(n, roots, shape)
            return
        self.encoder = Encoder(cfg, n)
        self.unet = DiffusionModelUNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            channels=cfg.unet_channels,
            attention_levels=cfg.unet_attention,
            num_res_blocks=cfg.unet_res_blocks,
            num_head_channels=cfg.unet_head_channels,
            norm_num_groups=cfg.unet_norm_groups,
            num_class_embeds=1,  # replaced below by the continuous z embedding
        )
        self.unet.class_embedding = ConditionEmbedding(n * cfg.latent_dim, cfg.unet_channels[0] * 4)
        if cfg.conditioning == "scale_shift":
            use_scale_shift(self.unet)

    @property
    def n_vars(self) -> int:
        return len(self.graph)

    @property
    def variant(self) -> str:
        return self.config.variant

    # --- the space the diffusion runs in ------------------------------------------------
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> what the encoder reads and the diffusion noises: the images themselves, or
        their coefficients (B, k) under the linear first stage."""
        return images if self.first_stage is None else self.first_stage.encode(images)

    def from_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`."""
        return x if self.first_stage is None else self.first_stage.decode(x)

    # --- latents ------------------------------------------------------------------------
    def encode(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(u | x0): mean and log-variance, (B, n, d); ``x0`` in the diffusion's space
        (:meth:`to_latent`)."""
        return self.encoder(x0)

    def causal_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """z at the posterior mean of u: the causal layer applied to q(u | x0)'s mean, (B, n, d); ``x0`` in the
        diffusion's space (:meth:`to_latent`)."""
        return self.causal(self.encode(x0)[0])

    def label_latent(self, y_norm: torch.Tensor) -> torch.Tensor:
        """mu(y): the latent block a normalised label value stands for. (..., n) -> (..., n, d)."""
        return y_norm.unsqueeze(-1).expand(*y_norm.shape, self.config.latent_dim)

    def latent_to_label(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`label_latent` in the least-squares sense: the block mean."""
        return z.mean(dim=-1)

    # --- denoiser -----------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """eps(x_t, t, z). ``z=None`` is the unconditional model; ``keep`` (B,) drops per sample."""
        b = x_t.shape[0]
        if z is None:
            flat = x_t.new_zeros(b, self.n_vars * self.config.latent_dim)
            keep = x_t.new_zeros(b)
        else:
            flat = z.reshape(b, -1).to(x_t.dtype)
            keep = x_t.new_ones(b) if keep is None else keep.to(x_t.dtype)
        if t.ndim == 0:
            t = t.expand(b)
        cond = torch.cat([flat, keep[:, None]], dim=1)
        if self.first_stage is not None:
            return self.denoiser(x_t, t, cond)
        return self.unet(x_t, timesteps=t, class_labels=cond)

    # --- training -----------------------------------------------------------------------
    def training_condition(self, u: torch.Tensor, y_norm: torch.Tensor | None,
                           labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The z the denoiser is trained on, and (B,) 1/0 whether a sample has one at all.

        CausalDiffAE and DiffAE: z = causal_layer(u) for every sample. Label-conditional: z = mu(y),
        the normalised labels, for labelled samples; unlabelled ones (or ``y_norm=None``) have no
        condition and train the unconditional model.
        """
        b = u.shape[0]
        if self.config.variant != "label_conditional":
            return self.causal(u, frozen=True), u.new_ones(b)
        if y_norm is None:
            return torch.zeros_like(u), u.new_zeros(b)
        has = u.new_ones(b) if labelled is None else labelled.to(u.dtype)
        return self.label_latent(y_norm.to(u.dtype)) * has[:, None, None], has

    def noisy_descendants(self, z: torch.Tensor) -> torch.Tensor:
        """z with ``config.descendant_noise`` added to the blocks of variables with parents: one draw per
        sample and block, the same in all the block's dimensions, so the denoiser cannot average it away."""
        std, blocks = self.config.descendant_noise, self._descendants
        if not std or not blocks:
            return z
        noise = torch.zeros(z.shape[0], z.shape[1], 1, device=z.device, dtype=z.dtype)
        noise[:, blocks] = torch.randn(z.shape[0], len(blocks), 1, device=z.device, dtype=z.dtype) * std
        return z + noise

    def loss(self, x0: torch.Tensor, y_norm: torch.Tensor | None, scheduler, gamma: float,
             labelled: torch.Tensor | None = None, weighting: str = "uniform", snr_gamma: float = 5.0,
             timestep_sampling: str = "uniform", encoded: bool = False,
             mechanism_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The objective of the configured variant on a batch (``encoded``: ``x0`` is already in the
        diffusion's space, :meth:`to_latent`, as a training set coded once by the first stage is).

        CausalDiffAE: denoising MSE (of eps or v, as the scheduler's ``prediction_type`` says; weighted
        over timesteps by ``weighting``, see :meth:`cdae_med.diffusion.DDIM.loss_weights`) + gamma * (KL(q(z|x0,y) || p(z|y)) + KL(q(u|x0) || N(0, I)) +
        mechanism_loss), each averaged over latent dimensions; only mechanism_loss trains the
        mechanisms, on ``mechanism_labels`` where given (normalised, else ``y_norm``). ``labelled`` (B,) bool marks
        samples whose labels are
        known; the label-prior term is taken over those only. DiffAE drops the label term (labels
        are ignored); the label-conditional model drops the N(0, I) term (see the module docstring).
        """
        b = x0.shape[0]
        variant = self.config.variant
        if not encoded:
            with torch.no_grad():
                x0 = self.to_latent(x0)  # images, or their coefficients under the (fixed) first stage
        if variant == "diffae":
            y_norm = None  # no label prior: the one switch that makes it DiffAE, with no mechanisms
        mean, logvar = self.encode(x0)
        u = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        z, has_condition = self.training_condition(u, y_norm, labelled)
        z = self.noisy_descendants(z)
        t = scheduler.sample_timesteps(b, x0.device, timestep_sampling)
        noise = torch.randn_like(x0)
        x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        keep = (torch.rand(b, device=x0.device) >= self.config.cond_drop_prob).to(x0.dtype)
        keep = keep * has_condition.to(x0.dtype)
        output = self.denoise(x_t, t, z, keep)
        err = ((output.float() - scheduler.target(x0, noise, t).float()) ** 2).flatten(1).mean(1)
        weights = scheduler.loss_weights(t, weighting, snr_gamma)
        mse = err.mean() if weights is None else (err * weights).mean()
        if variant == "label_conditional":
            kl_u = torch.zeros((), device=x0.device)
        else:
            kl_u = kl_normal(mean, logvar).mean()
        if y_norm is not None:
            # q(z | x0) under the additive SCM: mean = causal layer at u's mean; variance = u's.
            z_mean = self.causal(mean, frozen=True)
            kl_z_each = kl_normal(z_mean, logvar, self.label_latent(y_norm), self.config.prior_std)
            kl_z = labelled_mean(kl_z_each, labelled)
        else:
            kl_z = torch.zeros((), device=x0.device)
        mech = (self.mechanism_loss(y_norm if mechanism_labels is None else mechanism_labels, labelled)
                if y_norm is not None else torch.zeros((), device=x0.device))
        total = mse + gamma * (kl_z + kl_u + mech)
        return {"loss": total, "mse": mse.detach(), "kl_z": kl_z.detach(), "kl_u": kl_u.detach(),
                "mechanism": mech.detach()}

    def encoder_loss(self, x0: torch.Tensor, y_norm: torch.Tensor, labelled: torch.Tensor | None = None,
                     encoded: bool = False) -> torch.Tensor:
        """The encoder's terms of :meth:`loss` alone, KL(q(z|x0,y) || p(z|y)) + KL(q(u|x0) || N(0, I))
        (the label-conditional model: the first only), for encoder-only steps between full ones."""
        if self.config.variant == "diffae":
            raise ValueError("DiffAE's encoder has no label prior to take encoder-only steps on")
        if not encoded:
            with torch.no_grad():
                x0 = self.to_latent(x0)
        mean, logvar = self.encode(x0)
        z_mean = self.causal(mean, frozen=True)
        kl_z = labelled_mean(kl_normal(z_mean, logvar, self.label_latent(y_norm), self.config.prior_std), labelled)
        return kl_z + (kl_normal(mean, logvar).mean() if self.config.variant != "label_conditional" else 0.0)

    def mechanism_loss(self, y_norm: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
        """0.5 (mu(y_i) - f_i(mu(y_pa(i))))^2 averaged over latent dimensions, over labelled samples:
        each mechanism regressed on the labels; the only term that trains the mechanisms.

        KL(q(u|x0) || N(0, I)) has about the same optimum (with z pinned to mu(y), u_i = z_i - f_i),
        but through it f moves only as fast as the encoder's u gives way while the label prior
        (1 / prior_std^2 = 100x stronger) pushes f and u about together; regressing f directly, at a
        higher learning rate (``TrainConfig.mechanism_lr_factor``), is what recovers the labels'
        relation (docs/design-notes.md, "Mechanisms").
        """
        if not len(self.causal.mechanisms):
            return y_norm.new_zeros(())
        z = self.label_latent(y_norm.to(torch.float32))
        blocks = [z[:, i] for i in range(z.shape[1])]
        idx = self.causal.index
        err = torch.stack([(self.causal.mechanism(n, blocks) - blocks[idx[n]]) ** 2
                           for n in self.causal.mechanisms], dim=1)  # (B, n_mech, d)
        return labelled_mean(0.5 * err, labelled)
