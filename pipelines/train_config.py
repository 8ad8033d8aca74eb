"""The training parameters: one schema for the command line, the API and the worker.

:class:`TrainParameters` is what a user chooses (data set, budget, optimisation, model); its
fields carry the defaults, bounds and help text. ``cdae-med train`` builds its options from
them, the API's training request subclasses it, and the worker rebuilds it from a job's stored
parameters, so none of them repeats a default or a bound. :class:`TrainConfig` adds where and
how one process runs the training (output folder, device, a cohort on disk, DDP), which a
client of the service does not choose.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DATASET_NAMES", "Dataset", "Variant", "TrainParameters", "TrainConfig", "TINY_MODEL", "MODEL_DEFAULTS", "VOLUME_MODEL_DEFAULTS", "TEST_SET_SIZE",
           "test_seed", "parameter_help", "parameter_default", "describe_validation_error"]

DATASET_NAMES = ("pendulum", "morphomnist", "circuit", "brain")
Dataset = Literal["pendulum", "morphomnist", "circuit", "brain"]
Variant = Literal["causaldiffae", "diffae", "label_conditional"]

# A network small enough to train in seconds on 2 CPU cores: the tests' and the smoke benchmarks'.
TINY_MODEL = {"latent_dim": 4, "encoder_channels": (16, 32), "unet_channels": (32, 32, 32),
              "unet_attention": (False, False, True), "mechanism_hidden": 16}

# What a new model is built with where CausalDiffAEConfig's own default is kept for the checkpoints
# written before the setting existed: scale-shift conditioning measured best with v-prediction
# (benchmarks/results/recipes.md).
MODEL_DEFAULTS = {"conditioning": "scale_shift"}
# Volumes: self-attention only at the coarsest level; at the lower levels it dominates the cost of a
# volume denoiser pass on a CPU (docs/design-notes.md, "Attention in volume models").
VOLUME_MODEL_DEFAULTS = {"unet_attention": (False, False, True)}
# Settings of the network that the data set decides; a request may not override them.
_DERIVED_MODEL_SETTINGS = ("spatial_dims", "in_channels", "image_size")
TEST_SET_SIZE = 1000
# The largest size or count a model override may set (channels, latent dimensions, blocks).
MAX_MODEL_SIZE = 4096


def test_seed(seed: int) -> int:
    """The held-out test set's seed: far from any training seed a user is likely to pick."""
    return seed + 1_000_003


class TrainParameters(BaseModel):
    """What a user chooses for a training run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dataset: Dataset = Field("pendulum", description="Data set to train on.")
    steps: int = Field(100_000, ge=1, le=10_000_000, description="Stop after this many optimisation steps.")
    minutes: float | None = Field(
        12.0, ge=0, le=7 * 24 * 60,
        description="Stop after this many minutes of optimisation (0 or none = no time limit). The default run, "
                    "evaluation included, ends within 15 minutes on a 2-core CPU.")
    size: int | None = Field(None, ge=8, le=512,
                             description="Image side in pixels [default: the data set's, 32 for pendulum].")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimisation step.")
    lr: float = Field(3e-4, gt=0, le=1.0, description="AdamW learning rate.")
    mechanism_lr_factor: float = Field(
        10.0, gt=0, le=1000,
        description="The causal mechanisms learn at lr x this (see pipelines.train.parameter_groups).")
    n_train: int = Field(10_000, ge=1, le=1_000_000, description="Training images to generate.")
    # At most 2^32 - 1: the batch order seeds torch with seed x 1,000,003 + epoch, which must stay under 2^64.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data, initialisation and batch order.")
    gamma: float = Field(1.0, ge=0, description="Weight of the KL and mechanism terms.")
    gamma_warmup: int = Field(200, ge=0, description="Steps over which gamma ramps up from 0.")
    lr_warmup: int = Field(0, ge=0, le=1_000_000, description="Steps over which the learning rate ramps up "
                                                               "linearly from 0.")
    encoder_steps: int = Field(
        0, ge=0, le=64,
        description="Extra encoder-only steps after each step, on the encoder's terms of the loss alone (the label "
                    "prior and KL(q(u|x) || N(0, I))). An encoder step costs a small fraction of a full one, and "
                    "DCI on correlated factors follows how precisely the encoder reads the labels "
                    "(docs/design-notes.md, 'DCI on correlated factors').")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the weights' moving average.")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="What the denoiser predicts: the velocity (v_prediction, measured better in "
                                    "benchmarks/results/recipes.md) or the noise (epsilon).")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform", description="Weighting of the denoising loss over timesteps: uniform or min_snr "
                               "(min-SNR-gamma, Hang et al. 2023).")
    snr_gamma: float = Field(5.0, gt=0, le=1000, description="gamma of the min_snr weighting.")
    timestep_sampling: Literal["uniform", "stratified"] = Field(
        "uniform", description="How training timesteps are drawn: uniform, or stratified (one per equal "
                               "slice of the schedule within a batch).")
    eval_n: int = Field(32, ge=0, le=10_000, description="Test images scored against true counterfactuals at the end.")
    eval_steps: int = Field(50, ge=2, le=1000, description="DDIM steps of the end-of-training evaluation.")
    eval_depth: float = Field(1.0, gt=0, le=1, description="Inversion depth of the end-of-training evaluation.")
    eval_guidance: float = Field(1.0, gt=0, le=20, description="Guidance weight of the end-of-training evaluation.")
    eval_confine: float | None = Field(None, ge=0, lt=1, description=(
        "Confine the end-of-training evaluation's counterfactuals to where they change the image, at this share "
        "of the largest change (0 = off) [default: the pipeline's, cdae_med.pipeline.DEFAULT_CONFINE for a "
        "model that decodes images, off for one with a first stage]."))
    grid_rows: int = Field(6, ge=1, le=64, description="Test images in the counterfactual grid.")
    variant: Variant = Field("causaldiffae", description="Model: causaldiffae, diffae (no causal layer, no label "
                                                         "prior) or label_conditional (conditioned on the labels).")
    labelled_fraction: float = Field(1.0, ge=0, le=1, description="Weak supervision: share of training images "
                                                                  "whose labels are used (0-1).")
    slicewise: bool = Field(False, description="Volumes: a 2D model of axial slices instead of a 3D model "
                                               "(n_train then counts slices).")
    registration: Literal["rigid", "affine"] | None = Field(
        None, description="Volumes: register every scan to the cohort's reference before the model sees it "
                          "(rigid keeps head size; see pipelines.registration) [default: none].")
    spacing_mm: float | None = Field(None, gt=0, le=50, description="Volumes: voxel spacing of the model's grid "
                                                                    "in mm [default: the cohort's field of view / size].")
    model: dict[str, Any] = Field(default_factory=dict,
                                  description="CausalDiffAEConfig overrides, e.g. {\"latent_dim\": 8}.")

    @field_validator("model", mode="before")
    @classmethod
    def _no_overrides(cls, value: Any) -> Any:
        return {} if value is None else value  # jobs stored before the schema wrote null for "none"

    @model_validator(mode="after")
    def _check(self) -> "TrainParameters":
        if self.minutes == 0:
            self.minutes = None
        if self.slicewise and self.dataset != "brain":
            raise ValueError(f"slicewise applies to volume data sets (brain), not {self.dataset}")
        if self.registration and self.dataset != "brain":
            raise ValueError(f"registration applies to volume data sets (brain), not {self.dataset}")
        if self.model:
            from cdae_med.model import CausalDiffAEConfig

            known = set(CausalDiffAEConfig.__dataclass_fields__) - set(_DERIVED_MODEL_SETTINGS)
            unknown = sorted(set(self.model) - known)
            if unknown:
                raise ValueError(f"model: unknown settings {unknown}; known: {sorted(known)}")
            if "variant" in self.model and self.model["variant"] != self.variant:
                raise ValueError("model: give the variant as 'variant', not inside 'model'")
            for name, value in self.model.items():  # sizes and counts: the network would not build, or not fit
                items = value if isinstance(value, (list, tuple)) else [value]
                if any(isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= MAX_MODEL_SIZE
                       for v in items):
                    raise ValueError(f"model: {name} must be in [1, {MAX_MODEL_SIZE}], got {value}")
        # Build the network's config now, so a setting that cannot work fails before training, not after.
        from cdae_med.model import CausalDiffAEConfig

        dims = 3 if self.dataset == "brain" and not self.slicewise else 2
        size = self.size or 32  # every data set's default side
        try:
            CausalDiffAEConfig(**{"spatial_dims": dims, "image_size": (size,) * dims,
                                  **MODEL_DEFAULTS, **(VOLUME_MODEL_DEFAULTS if dims == 3 else {}), **self.model,
                                  "variant": self.variant})
        except (TypeError, ValueError) as err:
            raise ValueError(f"model: {err}") from None
        return self


class TrainConfig(TrainParameters):
    """A training run in this process: the user's parameters plus where and how it runs."""

    out: str = Field("runs/pendulum", description="Checkpoint directory.")
    device: str = Field("auto", description="auto, cpu or cuda.")
    checkpoint_minutes: float = Field(2.0, gt=0, description="Minutes between periodic checkpoints.")
    mnist_dir: str | None = Field(None, description="morphomnist: MNIST IDX files to use real digits.")
    data: str | None = Field(None, description="brain: a cohort of NIfTI scans (manifest CSV or its folder) "
                                               "instead of generated ones.")
    graph: str | None = Field(None, description="Causal graph: a built-in name or a YAML file [default: the data "
                                                "set's].")
    compile: bool = Field(False, description="GPU: torch.compile the training step (slow to start).")
    distributed: bool = Field(False, description="Data-parallel over the processes torchrun starts.")

    @classmethod
    def from_parameters(cls, params: TrainParameters | dict[str, Any], **run: Any) -> "TrainConfig":
        """A run of ``params`` (a model or its ``model_dump()``), with ``run``'s process settings."""
        values = params.model_dump() if isinstance(params, BaseModel) else dict(params)
        fields = set(TrainParameters.model_fields)
        return cls(**{k: v for k, v in values.items() if k in fields}, **run)


def parameter_default(name: str, model: type[BaseModel] = TrainConfig) -> Any:
    field = model.model_fields[name]
    return field.get_default(call_default_factory=True)


def parameter_help(name: str, model: type[BaseModel] = TrainConfig) -> str:
    return model.model_fields[name].description or ""


def _bounds(model: type[BaseModel], name: str) -> tuple[Any, Any]:
    lo = hi = None
    for m in model.model_fields[name].metadata:
        lo = getattr(m, "ge", getattr(m, "gt", lo)) if lo is None else lo
        hi = getattr(m, "le", getattr(m, "lt", hi)) if hi is None else hi
    return lo, hi


def describe_validation_error(err, model: type[BaseModel] = TrainConfig, names: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError of ``model`` as one line per problem, "; "-joined, each field named
    as the caller names it (``names``: field -> e.g. its command-line option)."""
    names = names or {}
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        field = names.get(loc, loc)
        kind, got = e.get("type", ""), e.get("input")
        if loc in model.model_fields and kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            lo, hi = (v if isinstance(v, int) or v is None else f"{v:g}" for v in _bounds(model, loc))
            if isinstance(got, int) and not isinstance(got, bool):  # counts: say which end was crossed
                where = f"at least {lo}" if kind.startswith("greater") else f"at most {hi}"
            else:
                where = f"in [{lo}, {hi}]" if lo is not None and hi is not None else \
                    f"at least {lo}" if lo is not None else f"at most {hi}"
            parts.append(f"{field} must be {where}, got {got}")
        elif kind == "literal_error":
            parts.append(f"unknown {field} {got!r}; available: {e.get('ctx', {}).get('expected', '')}")
        elif kind == "extra_forbidden":
            parts.append(f"{field}: unknown parameter; known: {', '.join(model.model_fields)}")
        else:
            msg = e.get("msg", "invalid").removeprefix("Value error, ")
            parts.append(f"{field}: {msg}" if loc else msg)
    return "; ".join(parts)
