"""Commands for researchers: train, evaluate, counterfactuals of images and scans, batches, data.

Training options are built from :class:`pipelines.train_config.TrainConfig` (defaults, bounds and
help text live there once); the run is validated by the same schema the API uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from pipelines.train_config import TrainConfig, parameter_default, parameter_help

from .errors import UserError, run

__all__ = ["register"]

data_app = typer.Typer(no_args_is_help=True, help="Synthetic data sets with ground-truth counterfactuals.")


def _param(name: str, *flags: str):
    """A Typer option whose default and help come from the training schema."""
    return typer.Option(parameter_default(name), *flags, help=parameter_help(name))


# options several commands share
_CHECKPOINT = typer.Option(..., help="Checkpoint directory written by `cdae-med train`.")
_SCAN_CHECKPOINT = typer.Option(None, help="Checkpoint directory written by `cdae-med train` [default for scans: "
                                           "the registered model --model].")
_REALISATION = typer.Option(None, help="Scans: how the change reaches the scan: intensity (the difference, as "
                                       "--residual puts it), deformation (a warp of the scan plus a residual), atrophy "
                                       "(the intensity change around the ventricles and half of it elsewhere, the rest "
                                       "of the model's brain-volume change made on the scan's own cortex), ventricles "
                                       "(the scan's own ventricles pushed by the model's ventricle-volume change, its "
                                       "intensity change elsewhere) or volumes (ventricles pushed, the rest as "
                                       "atrophy); all but intensity need a registered model [default: the model's].")
_RESIDUAL = typer.Option(None, help="Scans: the intensity part of the change upsampled (upsampled) or moved onto "
                                    "the scan's own tissue boundaries (tissue) [default: the model's].")
_SCAN_MODEL = typer.Option("brain", "--model", help="Scans: the registered model NAME or NAME:vN to use when no "
                                                    "--checkpoint is given (brain: the one cdae-med ships).")
_STEPS = typer.Option(50, help="DDIM steps.")
_CONFINE = typer.Option(None, min=0.0, max=0.99, help="Images: keep the counterfactual's change only where it reaches "
                                                      "this share of the image's largest change, the input's own "
                                                      "pixels elsewhere; 0 keeps it all [default: 0.35 for a model "
                                                      "that decodes images, off for scans].")
_DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
_QUIET = typer.Option(False, "--quiet", help="No progress bars.")


def _check_n(n: int) -> None:
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")


# the schema's fields as the command line names them, for its error messages
_FLAGS = {name: "--" + name.replace("_", "-") for name in TrainConfig.model_fields}
_FLAGS["dataset"] = "data set"


def train(
    dataset: str = _param("dataset"),
    out: Optional[Path] = typer.Option(None, help="Checkpoint directory [default: runs/DATASET]."),
    steps: int = _param("steps"),
    minutes: float = _param("minutes"),
    size: Optional[int] = _param("size"),
    batch_size: int = _param("batch_size"),
    lr: float = _param("lr"),
    lr_warmup: int = _param("lr_warmup"),
    encoder_steps: int = _param("encoder_steps"),
    prediction_type: str = _param("prediction_type"),
    mechanism_input: Optional[str] = typer.Option(
        None, help="What each causal mechanism reads of its parents: blocks (their whole latent blocks) or values "
                   "(each parent's value, the block's mean, so an intervention moves a child by the change of value "
                   "alone; cdae_med.model.CausalLayer) [default: blocks]."),
    loss_weighting: str = _param("loss_weighting"),
    timestep_sampling: str = _param("timestep_sampling"),
    conditioning: Optional[str] = typer.Option(None, help="How z enters the denoiser's blocks: scale_shift "
                                                           "(AdaGN) or add [default: scale_shift]."),
    latent_components: Optional[int] = typer.Option(
        None, help="Run the diffusion on this many principal components of the (registered) images, with MLP "
                   "networks, instead of a UNet on the images [default: 0, the UNet]."),
    latent_shape_components: Optional[int] = typer.Option(
        None, help="With --latent-components: code each image as this many principal components of its "
                   "displacement from the cohort's mean image (demons) beside --latent-components of the "
                   "intensity residual; its counterfactuals can then move tissue (--realisation deformation) "
                   "[default: 0]."),
    latent_shape_smoothing: Optional[float] = typer.Option(
        None, help="Smoothness of those displacements (demons' Gaussian, voxels of the model grid) [default: 2]."),
    latent_quantiles: Optional[int] = typer.Option(
        None, help="With --latent-components and no shape components: take the principal components of every "
                   "voxel's normal score under this many quantiles of the training images there, so a "
                   "counterfactual changes each subject's voxels by where they sit in the cohort [default: 0, "
                   "intensities]."),
    latent_denoiser: Optional[str] = typer.Option(
        None, help="With --latent-components: the denoiser of the code: mlp, mlp+linear (the MLP beside a "
                   "linear path, the exact denoiser of a code Gaussian about a mean linear in z) or linear (that "
                   "path alone; give it more steps than the MLP) [default: mlp]."),
    voxel_spread: bool = typer.Option(
        False, "--voxel-spread", help="With --latent-components: also fit every voxel's spread about its mean as a "
                                      "function of the graph's root variables, so a counterfactual scales the "
                                      "subject's own deviation there (where atrophy spreads with age)."),
    descendant_noise: Optional[float] = typer.Option(
        None, help="Std (normalised units) of noise on the latent blocks of variables with parents in the z the "
                   "denoiser is trained on: the decoder then draws the parents' content from their own blocks "
                   "(interventions on a descendant keep the parents) but follows the descendant's block less "
                   "[default: 0]."),
    n_train: int = _param("n_train"),
    seed: int = _param("seed"),
    device: str = _param("device"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out."),
    eval_n: int = _param("eval_n"),
    mnist_dir: Optional[Path] = _param("mnist_dir"),
    variant: str = _param("variant"),
    labelled_fraction: float = _param("labelled_fraction"),
    cond_drop_prob: Optional[float] = typer.Option(None, help="Rate at which z is dropped in training, for "
                                                              "guidance (default: the model's, 0.1)."),
    data: Optional[Path] = _param("data"),
    graph: Optional[str] = _param("graph"),
    spacing_mm: Optional[float] = _param("spacing_mm"),
    registration: Optional[str] = _param("registration"),
    compile: bool = typer.Option(False, "--compile", help=parameter_help("compile")),
    distributed: bool = typer.Option(False, "--distributed", help=parameter_help("distributed")),
    slicewise: bool = typer.Option(False, "--slicewise", help=parameter_help("slicewise")),
    quiet: bool = _QUIET,
    register_as: Optional[str] = typer.Option(None, "--register-as", help="Register the finished model in the "
                                              "registry (CDAE_HOME/models) under this name [default: the data set]."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not register the finished model."),
) -> None:
    """Train a CausalDiffAE; writes a checkpoint, metrics.json and counterfactual_grid.png, and registers it."""
    from pydantic import ValidationError

    import pipelines.train
    from pipelines.registry import check_name, register
    from pipelines.train_config import describe_validation_error

    def go():
        if register_as is not None:
            check_name(register_as)
        try:
            cfg = TrainConfig(
                dataset=dataset, out=str(out or Path("runs") / dataset), steps=steps, minutes=minutes, size=size,
                batch_size=batch_size, lr=lr, lr_warmup=lr_warmup, encoder_steps=encoder_steps,
                prediction_type=prediction_type,
                loss_weighting=loss_weighting, timestep_sampling=timestep_sampling,
                n_train=n_train, seed=seed, device=device, eval_n=eval_n,
                mnist_dir=str(mnist_dir) if mnist_dir else None, variant=variant,
                labelled_fraction=labelled_fraction,
                model={**({} if cond_drop_prob is None else {"cond_drop_prob": cond_drop_prob}),
                       **({} if conditioning is None else {"conditioning": conditioning}),
                       **({} if mechanism_input is None else {"mechanism_input": mechanism_input}),
                       **({} if latent_components is None else {"latent_components": latent_components}),
                       **({} if latent_shape_components is None
                          else {"latent_shape_components": latent_shape_components}),
                       **({} if latent_shape_smoothing is None else {"latent_shape_smoothing": latent_shape_smoothing}),
                       **({} if latent_quantiles is None else {"latent_quantiles": latent_quantiles}),
                       **_latent_denoiser(latent_denoiser),
                       **({"voxel_spread": True} if voxel_spread else {}),
                       **({} if descendant_noise is None else {"descendant_noise": descendant_noise})},
                data=str(data) if data else None, graph=graph, spacing_mm=spacing_mm, slicewise=slicewise,
                registration=registration,
                distributed=distributed, compile=compile)
        except ValidationError as err:
            # --cond-drop-prob and --conditioning are model settings; the schema checks them inside "model"
            message = (describe_validation_error(err, names=_FLAGS).replace("model: cond_drop_prob", "--cond-drop-prob")
                       .replace("model: unknown conditioning", "unknown --conditioning")
                       .replace("model: unknown mechanism_input", "unknown --mechanism-input")
                       .replace("model: latent_components", "--latent-components")
                       .replace("model: latent_shape_components", "--latent-shape-components")
                       .replace("model: latent_shape_smoothing", "--latent-shape-smoothing")
                       .replace("model: latent_quantiles", "--latent-quantiles")
                       .replace("model: the latent denoiser (latent_linear_path, latent_mlp)", "--latent-denoiser")
                       .replace("model: voxel_spread", "--voxel-spread")
                       .replace("model: descendant_noise", "--descendant-noise"))
            raise UserError(message) from None
        path = pipelines.train.train(cfg, progress=not quiet, resume=resume)
        if distributed and os.environ.get("RANK", "0") != "0":
            return  # rank 0 reports (RANK is torchrun's)
        metrics = json.loads((path / "metrics.json").read_text())
        typer.echo(f"checkpoint: {path}")
        if not no_register:
            registered = register(path, name=register_as or dataset)
            typer.echo(f"registered as {registered.ref} ({registered.path})")
        if (path / "counterfactual_grid.png").exists():
            typer.echo(f"counterfactual grid: {path / 'counterfactual_grid.png'}")
        ev = metrics.get("eval")
        if ev:
            typer.echo(f"reconstruction MAE {ev['reconstruction_mae']:.2f}/255")
            for key in ev:
                if key.endswith("_copy_input_mae"):
                    v = key[3:-len("_copy_input_mae")]
                    typer.echo(f"do({v}) MAE vs true counterfactual {ev[f'do_{v}_mae']:.2f}/255 "
                               f"(copying the input: {ev[key]:.2f})")

    run(go)


LATENT_DENOISERS = {"mlp": {"latent_linear_path": False, "latent_mlp": True},
                    "mlp+linear": {"latent_linear_path": True, "latent_mlp": True},
                    "linear": {"latent_linear_path": True, "latent_mlp": False}}


def _latent_denoiser(name: str | None) -> dict:
    """The model settings ``--latent-denoiser NAME`` stands for."""
    if name is None:
        return {}
    if name not in LATENT_DENOISERS:
        raise UserError(f"unknown --latent-denoiser {name!r}; available: {', '.join(LATENT_DENOISERS)}")
    return LATENT_DENOISERS[name]


def data_generate(
    dataset: str = typer.Option(..., help="pendulum, morphomnist, circuit or brain."),
    out: Path = typer.Option(..., help="Output directory."),
    n: int = typer.Option(1000, help="Number of samples."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed."),
    mnist_dir: Optional[Path] = typer.Option(None, help="morphomnist: MNIST IDX files to use real digits."),
) -> None:
    """Write images (NIfTI volumes for brain) and a labels CSV with units for a synthetic data set."""
    from pipelines.datasets import get_dataset

    def go():
        _check_n(n)
        ds = get_dataset(dataset, mnist_dir=str(mnist_dir) if mnist_dir else None)
        csv = ds.write(out, n=n, size=size or ds.default_size, seed=seed)
        typer.echo(f"wrote {n} samples to {out} (labels: {csv})")

    run(go)


def _scan_checkpoint(checkpoint: Path | None, model: str) -> Path:
    """The checkpoint a scan command runs: the one given, or the registered model's."""
    if checkpoint is not None:
        return checkpoint
    from pipelines.registry import RegistryError, resolve

    try:
        return resolve(model).path
    except RegistryError as err:
        raise UserError(str(err)) from None


def counterfactual(
    checkpoint: Optional[Path] = _SCAN_CHECKPOINT,
    model: str = _SCAN_MODEL,
    do: List[str] = typer.Option(..., "--do", help="Intervention variable=value in the variable's units; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Images: the output PNG."),
    out_dir: Optional[Path] = typer.Option(None, help="Scans: folder for counterfactual.nii.gz, difference.nii.gz, "
                                                      "preview.png and report.json."),
    dataset: Optional[str] = typer.Option(None, help="Take the factual image from this data set's test set..."),
    index: Optional[int] = typer.Option(None, help="...at this index."),
    input: Optional[Path] = typer.Option(None, "--input", help="Or a PNG of the model's size, or a NIfTI scan "
                                                               "(.nii/.nii.gz) for a model trained on scans."),
    covariates: Optional[str] = typer.Option(None, help="Scans: factual values you know, e.g. age=52,sex=F; the "
                                                        "others are estimated from the image."),
    steps: int = _STEPS,
    depth: Optional[float] = typer.Option(None, help="Inversion depth in (0, 1]; default: a scan model's own "
                                                     "(its checkpoint's image.depth), else 1.0."),
    guidance: float = typer.Option(1.0, help="Guidance weight (1 = plain conditional decoding)."),
    out_of_range: str = typer.Option("flag", help="Scans: an intervention outside the training range is "
                                                  "flagged in the report (flag) or refused (refuse)."),
    realisation: Optional[str] = _REALISATION,
    residual: Optional[str] = _RESIDUAL,
    confine: Optional[float] = _CONFINE,
    device: str = _DEVICE,
) -> None:
    """Counterfactual of one image or scan under do(...); prints a JSON report of the values it implies."""
    from cdae_med.io import is_nifti
    from cdae_med.values import parse_assignments

    def go():
        if (input is None) == (index is None):
            raise UserError("give either --input IMAGE_OR_SCAN or --dataset NAME --index I")
        do_map = parse_assignments(do, "--do")
        if input is not None and is_nifti(input):
            if out_dir is None:
                raise UserError("a scan's counterfactual needs --out-dir DIR (it writes four files)")
            if confine:
                raise UserError("--confine is for images; a scan's change is realised on the scan itself "
                                "(--realisation)")
            from pipelines.scans import ScanModel

            scans = ScanModel.load(_scan_checkpoint(checkpoint, model), device=device, num_steps=steps, depth=depth,
                                   guidance=guidance, out_of_range=out_of_range, realisation=realisation,
                                   residual=residual)
            given = parse_assignments(covariates.split(","), "--covariates") if covariates else {}
            report = scans.run(input, do_map, out_dir, covariates=given)
            typer.echo(json.dumps(report, indent=2))
            typer.echo(f"wrote {', '.join(report['files'])} to {out_dir}", err=True)
            return
        if out is None:
            raise UserError("an image's counterfactual needs --out FILE.png")
        if checkpoint is None:
            raise UserError("an image's counterfactual needs --checkpoint DIR (the registered models are for scans)")
        _image_counterfactual(checkpoint, do_map, out, dataset, index, input, steps, 1.0 if depth is None else depth,
                              guidance, device, confine)

    run(go)


def _image_counterfactual(checkpoint, do_map, out, dataset, index, input, steps, depth, guidance, device,
                          confine) -> None:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cdae_med.pipeline import CounterfactualPipeline
    from cdae_med.values import parse_values
    from pipelines.datasets import get_dataset, to_tensor, to_uint8
    from pipelines.train_config import TEST_SET_SIZE, test_seed

    pipe = CounterfactualPipeline.from_checkpoint(checkpoint, device)
    ckpt, graph = pipe.checkpoint, pipe.graph
    interventions = parse_values(graph, do_map, allow_empty=False)
    confine = pipe.resolve_confine(confine)
    channels, size = ckpt.image["channels"], ckpt.image["size"]
    if input is not None:
        if len(size) != 2:
            raise UserError(f"{checkpoint} takes 3D volumes; give a .nii or .nii.gz scan")
        h, w = size
        try:
            img = Image.open(input)
            img.load()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {input}: {err}") from None
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (w, h):
            raise UserError(f"{input} is {img.size[0]}x{img.size[1]} px; this model takes {w}x{h}")
        arr = np.asarray(img)[None]
        arr = arr if arr.ndim == 4 else arr[..., None]
    else:
        name = dataset or ckpt.dataset
        if name != ckpt.dataset:
            raise UserError(f"the checkpoint was trained on {ckpt.dataset!r}, not {name!r}")
        if not 0 <= index < TEST_SET_SIZE:
            raise UserError(f"--index must be in [0, {TEST_SET_SIZE}), got {index}")
        if len(size) == 3:
            raise UserError("for volumes, write the cohort with `cdae-med data generate --dataset brain` "
                            "and pass a scan with --input")
        # Generators give the same first k samples for any n, so only index + 1 are drawn.
        arr = get_dataset(name).sample(index + 1, seed=test_seed(ckpt.training.get("seed", 0)),
                                       size=size[0]).images[index:]
    res = pipe(to_tensor(arr), interventions, num_steps=steps, depth=depth, guidance=guidance, confine=confine)
    out_img = to_uint8(res.images)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out_img.squeeze(-1) if out_img.shape[-1] == 1 else out_img).save(out)
    roles = graph.roles(interventions)
    report = {
        "interventions": interventions,
        "factual_estimated": res.values(graph, 0, "factual"),
        "counterfactual": res.values(graph, 0),
        "changed": [n for n, role in roles.items() if role != "unchanged"],
        "units": {v.name: v.unit for v in graph.variables},
    }
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"wrote {out}", err=True)


def batch(
    checkpoint: Optional[Path] = _SCAN_CHECKPOINT,
    model: str = _SCAN_MODEL,
    do: List[str] = typer.Option(..., "--do", help="Intervention variable=value, the same for every scan; repeatable."),
    out_dir: Path = typer.Option(..., help="Output folder: one sub-folder per subject and summary.csv."),
    manifest: Optional[Path] = typer.Option(None, help="CSV with subject_id, path and optional columns of known "
                                                       "factual values (graph variables)."),
    folder: Optional[Path] = typer.Option(None, help="Or a folder of .nii/.nii.gz files."),
    batch_size: int = typer.Option(4, help="Scans per forward pass."),
    steps: int = _STEPS,
    guidance: float = typer.Option(1.0, help="Guidance weight, factual reference (1 = plain conditional "
                                             "decoding; > 1 amplifies the intervention's effect)."),
    realisation: Optional[str] = _REALISATION,
    residual: Optional[str] = _RESIDUAL,
    device: str = _DEVICE,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Counterfactuals of many scans; resumable (a rerun keeps subjects finished for the same
    request and recomputes the others); a failed scan is reported in summary.csv and skipped.
    Exit status 1 when any scan failed, 2 for bad input."""
    import csv

    from cdae_med.values import parse_assignments
    from pipelines.batch import run_batch
    from pipelines.cohort import read_manifest, subjects_in_folder
    from pipelines.scans import ScanModel

    def go():
        if (manifest is None) == (folder is None):
            raise UserError("give either --manifest CSV or --folder DIR")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        do_map = parse_assignments(do, "--do")
        scans = ScanModel.load(_scan_checkpoint(checkpoint, model), device=device, num_steps=steps, guidance=guidance,
                               realisation=realisation, residual=residual)
        do_values = scans.interventions(do_map)
        subjects = (read_manifest(manifest, scans.graph, require_all=False) if manifest is not None
                    else subjects_in_folder(folder))
        summary = run_batch(scans, subjects, do_values, out_dir, batch_size=batch_size, progress=not quiet)
        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "done earlier", "failed")}
        typer.echo(f"{counts['done']} done, {counts['done earlier']} done earlier, {counts['failed']} failed; "
                   f"summary: {summary}")
        for r in rows:
            if r["status"] == "failed":
                typer.echo(f"  failed {r['subject_id']}: {r['error']}", err=True)
        return counts["failed"], len(rows)

    failed, total = run(go)
    if failed:
        typer.secho(f"error: {failed} of {total} scans failed (see the summary)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def evaluate(
    checkpoint: Path = _CHECKPOINT,
    out: Optional[Path] = typer.Option(None, help="Output directory [default: CHECKPOINT/evaluation]."),
    n: int = typer.Option(64, help="Test images per intervention."),
    steps: int = _STEPS,
    depth: float = typer.Option(1.0, help="Inversion depth in (0, 1]."),
    guidance: float = typer.Option(1.0, help="Guidance weight."),
    procedure: str = typer.Option("ddim", help="ddim (ours) or original (fresh noise, no propagation)."),
    reference: str = typer.Option("factual", help="Guidance reference: factual (ours) or null (the paper's "
                                                  "classifier-free form)."),
    hold: int = typer.Option(0, min=0, max=10, help="Rounds of holding the variables an intervention leaves at "
                                                   "their factual read-out (each one more decoding)."),
    confine: Optional[float] = _CONFINE,
    device: str = _DEVICE,
    quiet: bool = _QUIET,
) -> None:
    """DCI, effectiveness, composition, reversibility and error against true counterfactuals."""
    from pipelines.evaluate import evaluate as run_evaluate

    def go():
        _check_n(n)
        result = run_evaluate(checkpoint, out, n=n, num_steps=steps, depth=depth, guidance=guidance,
                              procedure=procedure, device=device, progress=not quiet, reference=reference,
                              hold=hold, confine=confine)
        dest = Path(out or Path(checkpoint) / "evaluation")
        typer.echo((dest / "evaluation.md").read_text())
        typer.echo(f"wrote {dest}/evaluation.json, evaluation.md, counterfactual_grid.png, sweep.png", err=True)
        return result

    run(go)


def guidance_sweep(
    checkpoint: Path = _CHECKPOINT,
    out: Optional[Path] = typer.Option(None, help="Output directory [default: CHECKPOINT/guidance_sweep]."),
    omega: List[float] = typer.Option([0.0, 1.0, 2.0, 3.0, 5.0], "--omega", help="Guidance weight; repeatable."),
    reference: str = typer.Option("null", help="null (the paper's classifier-free guidance) or factual (ours)."),
    n: int = typer.Option(32, help="Test images per intervention."),
    steps: int = _STEPS,
    device: str = _DEVICE,
    quiet: bool = _QUIET,
) -> None:
    """Effectiveness and composition across the guidance weight omega: JSON and a PNG figure."""
    from pipelines.guidance_sweep import guidance_sweep as run_sweep

    def go():
        _check_n(n)
        if reference not in ("null", "factual"):
            raise UserError(f"--reference must be null or factual, got {reference!r}")
        dest = Path(out or Path(checkpoint) / "guidance_sweep")
        res = run_sweep(checkpoint, dest, omegas=omega, reference=reference, n=n, num_steps=steps,
                        device=device, progress=not quiet)
        typer.echo(json.dumps(res["rows"], indent=2))
        typer.echo(f"wrote {dest}/guidance_sweep.json, guidance_sweep.png", err=True)

    run(go)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(counterfactual)
    app.command()(batch)
    app.command()(evaluate)
    app.command("guidance-sweep")(guidance_sweep)
    data_app.command("generate")(data_generate)
    app.add_typer(data_app, name="data")
