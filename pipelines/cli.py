"""The ``cdae-med`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Causal counterfactuals of images with Causal Diffusion Autoencoders.")
data_app = typer.Typer(no_args_is_help=True, help="Synthetic data sets with ground-truth counterfactuals.")
app.add_typer(data_app, name="data")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run(fn):
    """Turn the library's input errors into one clear line instead of a traceback."""
    from cdae_med.checkpoint import CheckpointError
    from cdae_med.graph import GraphError

    try:
        return fn()
    except (UserError, GraphError, CheckpointError, ValueError, FileNotFoundError) as err:
        _fail(str(err))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def train(
    dataset: str = typer.Option("pendulum", help="Data set to train on."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint directory [default: runs/DATASET]."),
    steps: int = typer.Option(100_000, help="Stop after this many optimisation steps."),
    minutes: float = typer.Option(12.0, help="Stop after this many minutes of optimisation (0 = no time limit). "
                                             "The default run, evaluation included, ends within 15 minutes on a 2-core CPU."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels [default: the data set's, 32 for pendulum]."),
    batch_size: int = typer.Option(32, help="Images per optimisation step."),
    lr: float = typer.Option(3e-4, help="AdamW learning rate."),
    n_train: int = typer.Option(10_000, help="Training images to generate."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and batch order."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out."),
    eval_n: int = typer.Option(32, help="Test images scored against true counterfactuals at the end."),
    mnist_dir: Optional[Path] = typer.Option(None, help="morphomnist: MNIST IDX files to use real digits."),
    variant: str = typer.Option("causaldiffae", help="Model: causaldiffae, diffae (no causal layer, no label "
                                                     "prior) or label_conditional (conditioned on the labels)."),
    labelled_fraction: float = typer.Option(1.0, help="Weak supervision: share of training images whose labels "
                                                      "are used (0-1)."),
    cond_drop_prob: Optional[float] = typer.Option(None, help="Rate at which z is dropped in training, for "
                                                              "guidance (default: the model's, 0.1)."),
    data: Optional[Path] = typer.Option(None, help="brain: train on a cohort of NIfTI scans instead of generated "
                                                   "ones: a manifest CSV (subject_id, path, one column per graph "
                                                   "variable) or a folder holding manifest.csv."),
    graph: Optional[str] = typer.Option(None, help="Causal graph: a built-in name or a YAML file "
                                                   "[default: the data set's]."),
    spacing_mm: Optional[float] = typer.Option(None, help="Volumes: voxel spacing of the model's grid in mm "
                                                          "[default: 192 mm / size]."),
    compile: bool = typer.Option(False, "--compile", help="GPU: torch.compile the training step (slow to start)."),
    distributed: bool = typer.Option(False, "--distributed", help="Data-parallel over the processes torchrun "
                                                                  "starts (one per GPU; gloo on CPUs)."),
    slicewise: bool = typer.Option(False, "--slicewise", help="Volumes: a 2D model of axial slices instead of a "
                                                              "3D model (--n-train then counts slices)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    register_as: Optional[str] = typer.Option(None, "--register-as", help="Register the finished model in the "
                                              "registry (CDAE_HOME/models) under this name [default: the data set]."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not register the finished model."),
) -> None:
    """Train a CausalDiffAE; writes a checkpoint, metrics.json and counterfactual_grid.png, and registers it."""
    from .datasets import DATASETS
    from .train import TrainConfig, train as run_train

    def go():
        if dataset not in DATASETS:
            raise UserError(f"unknown data set {dataset!r}; available: {', '.join(DATASETS)}")
        for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--n-train", n_train)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if minutes < 0:
            raise UserError(f"--minutes must be >= 0, got {minutes}")
        if register_as is not None:
            from .registry import check_name

            check_name(register_as)
        from cdae_med.model import VARIANTS
        if variant not in VARIANTS:
            raise UserError(f"unknown --variant {variant!r}; available: {', '.join(VARIANTS)}")
        if not 0.0 <= labelled_fraction <= 1.0:
            raise UserError(f"--labelled-fraction must be in [0, 1], got {labelled_fraction}")
        if cond_drop_prob is not None and not 0.0 <= cond_drop_prob < 1.0:
            raise UserError(f"--cond-drop-prob must be in [0, 1), got {cond_drop_prob}")
        cfg = TrainConfig(dataset=dataset, out=str(out or Path("runs") / dataset), steps=steps,
                          minutes=minutes or None, size=size, batch_size=batch_size, lr=lr, n_train=n_train,
                          seed=seed, device=device, eval_n=eval_n,
                          mnist_dir=str(mnist_dir) if mnist_dir else None, variant=variant,
                          labelled_fraction=labelled_fraction,
                          model={} if cond_drop_prob is None else {"cond_drop_prob": cond_drop_prob},
                          data=str(data) if data else None, graph=graph, spacing_mm=spacing_mm,
                          slicewise=slicewise, distributed=distributed, compile=compile)
        path = run_train(cfg, progress=not quiet, resume=resume)
        if distributed and os.environ.get("RANK", "0") != "0":
            return  # rank 0 reports
        metrics = json.loads((path / "metrics.json").read_text())
        typer.echo(f"checkpoint: {path}")
        if not no_register:
            from .registry import register

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

    _run(go)


@data_app.command("generate")
def data_generate(
    dataset: str = typer.Option(..., help="pendulum, morphomnist, circuit or brain."),
    out: Path = typer.Option(..., help="Output directory."),
    n: int = typer.Option(1000, help="Number of samples."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed."),
    mnist_dir: Optional[Path] = typer.Option(None, help="morphomnist: MNIST IDX files to use real digits."),
) -> None:
    """Write images (NIfTI volumes for brain) and a labels CSV with units for a synthetic data set."""
    from .datasets import get_dataset

    def go():
        if n < 1:
            raise UserError(f"--n must be at least 1, got {n}")
        ds = get_dataset(dataset, mnist_dir=str(mnist_dir) if mnist_dir else None)
        csv = ds.write(out, n=n, size=size or ds.default_size, seed=seed)
        typer.echo(f"wrote {n} samples to {out} (labels: {csv})")

    _run(go)


@app.command()
def counterfactual(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory written by `cdae-med train`."),
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
    steps: int = typer.Option(50, help="DDIM steps."),
    depth: float = typer.Option(1.0, help="Inversion depth in (0, 1]."),
    guidance: float = typer.Option(1.0, help="Guidance weight (1 = plain conditional decoding)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Counterfactual of one image or scan under do(...); prints a JSON report of the values it implies."""
    from cdae_med.io import is_nifti

    def go():
        if (input is None) == (index is None):
            raise UserError("give either --input IMAGE_OR_SCAN or --dataset NAME --index I")
        if input is not None and is_nifti(input):
            if out_dir is None:
                raise UserError("a scan's counterfactual needs --out-dir DIR (it writes four files)")
            report = _scan_counterfactual()
            typer.echo(json.dumps(report, indent=2))
            typer.echo(f"wrote {', '.join(report['files'])} to {out_dir}", err=True)
            return
        if out is None:
            raise UserError("an image's counterfactual needs --out FILE.png")
        _image_counterfactual()

    def _scan_counterfactual() -> dict:
        from .scans import ScanModel

        model = ScanModel.load(checkpoint, device=device, num_steps=steps, depth=depth, guidance=guidance)
        do_map = dict(_pairs(do, "--do"))
        given = dict(_pairs(covariates.split(","), "--covariates")) if covariates else {}
        return model.run(input, do_map, out_dir, covariates=given)

    def _image_counterfactual() -> None:
        import numpy as np
        import torch
        from PIL import Image, UnidentifiedImageError

        from cdae_med.checkpoint import load_checkpoint
        from cdae_med.counterfactual import counterfactual as run_cf, parse_do
        from cdae_med.diffusion import DDIM

        from .datasets import get_dataset, to_tensor, to_uint8
        from .runtime import autocast, resolve_device
        from .train import TEST_SET_SIZE, test_seed

        ckpt = load_checkpoint(checkpoint)
        graph = ckpt.graph
        interventions = parse_do(graph, do)
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
            ds = get_dataset(name)
            # Generators give the same first k samples for any n, so only index + 1 are drawn.
            arr = ds.sample(index + 1, seed=test_seed(ckpt.training.get("seed", 0)), size=size[0]).images[index:]
            if len(size) == 3:
                raise UserError("for volumes, write the cohort with `cdae-med data generate --dataset brain` "
                                "and pass a scan with --input")
        dev = resolve_device(device)
        model = ckpt.model.to(dev)
        ddim = DDIM(model.config.num_train_timesteps, model.config.beta_start, model.config.beta_end)
        ddim.scheduler.alphas_cumprod = ddim.scheduler.alphas_cumprod.to(dev)
        with torch.no_grad(), autocast(dev):
            res = run_cf(model, ddim, to_tensor(arr).to(dev), interventions, num_steps=steps, depth=depth,
                         guidance=guidance)
        out_img = to_uint8(res.image)[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out_img.squeeze(-1) if out_img.shape[-1] == 1 else out_img).save(out)
        report = {
            "interventions": interventions,
            "factual_estimated": dict(zip(graph.names, res.factual[0].tolist())),
            "counterfactual": dict(zip(graph.names, res.values[0].tolist())),
            "changed": [n for n in graph.order if n in interventions or
                        any(n in graph.descendants(v) for v in interventions)],
            "units": {v.name: v.unit for v in graph.variables},
        }
        typer.echo(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}", err=True)

    _run(go)


def _pairs(items, option: str) -> list[tuple[str, str]]:
    """['age=70', 'sex=F'] -> [('age', '70'), ('sex', 'F')]; a repeated name is an error."""
    pairs, seen = [], set()
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise UserError(f"{option} {item!r} is not of the form variable=value")
        if name in seen:
            raise UserError(f"{option}: {name!r} is given twice")
        seen.add(name)
        pairs.append((name, value.strip()))
    return pairs


@app.command()
def batch(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory of a model trained on scans."),
    do: List[str] = typer.Option(..., "--do", help="Intervention variable=value, the same for every scan; repeatable."),
    out_dir: Path = typer.Option(..., help="Output folder: one sub-folder per subject and summary.csv."),
    manifest: Optional[Path] = typer.Option(None, help="CSV with subject_id, path and optional columns of known "
                                                       "factual values (graph variables)."),
    folder: Optional[Path] = typer.Option(None, help="Or a folder of .nii/.nii.gz files."),
    batch_size: int = typer.Option(4, help="Scans per forward pass."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance: float = typer.Option(1.0, help="Guidance weight, factual reference (1 = plain conditional "
                                             "decoding; > 1 amplifies the intervention's effect)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Counterfactuals of many scans; resumable (a rerun skips finished subjects); a failed scan is
    reported in summary.csv and skipped."""
    import csv

    from .cohort import read_manifest, subjects_in_folder
    from .scans import ScanModel, run_batch

    def go():
        if (manifest is None) == (folder is None):
            raise UserError("give either --manifest CSV or --folder DIR")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        model = ScanModel.load(checkpoint, device=device, num_steps=steps, guidance=guidance)
        do_map = model.interventions(dict(_pairs(do, "--do")))
        subjects = (read_manifest(manifest, model.graph, require_all=False) if manifest is not None
                    else subjects_in_folder(folder))
        summary = run_batch(model, subjects, do_map, out_dir, batch_size=batch_size, progress=not quiet)
        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "done earlier", "failed")}
        typer.echo(f"{counts['done']} done, {counts['done earlier']} done earlier, {counts['failed']} failed; "
                   f"summary: {summary}")
        for r in rows:
            if r["status"] == "failed":
                typer.echo(f"  failed {r['subject_id']}: {r['error']}", err=True)

    _run(go)


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory written by `cdae-med train`."),
    out: Optional[Path] = typer.Option(None, help="Output directory [default: CHECKPOINT/evaluation]."),
    n: int = typer.Option(64, help="Test images per intervention."),
    steps: int = typer.Option(50, help="DDIM steps."),
    depth: float = typer.Option(1.0, help="Inversion depth in (0, 1]."),
    guidance: float = typer.Option(1.0, help="Guidance weight."),
    procedure: str = typer.Option("ddim", help="ddim (ours) or original (fresh noise, no propagation)."),
    reference: str = typer.Option("factual", help="Guidance reference: factual (ours) or null (the paper's "
                                                  "classifier-free form)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """DCI, effectiveness, composition, reversibility and error against true counterfactuals."""
    from .evaluate import evaluate as run_evaluate

    def go():
        if n < 1:
            raise UserError(f"--n must be at least 1, got {n}")
        result = run_evaluate(checkpoint, out, n=n, num_steps=steps, depth=depth, guidance=guidance,
                              procedure=procedure, device=device, progress=not quiet,
                              reference=reference)
        dest = Path(out or Path(checkpoint) / "evaluation")
        typer.echo((dest / "evaluation.md").read_text())
        typer.echo(f"wrote {dest}/evaluation.json, evaluation.md, counterfactual_grid.png, sweep.png", err=True)
        return result

    _run(go)


@app.command("guidance-sweep")
def guidance_sweep_command(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory written by `cdae-med train`."),
    out: Optional[Path] = typer.Option(None, help="Output directory [default: CHECKPOINT/guidance_sweep]."),
    omega: List[float] = typer.Option([0.0, 1.0, 2.0, 3.0, 5.0], "--omega", help="Guidance weight; repeatable."),
    reference: str = typer.Option("null", help="null (the paper's classifier-free guidance) or factual (ours)."),
    n: int = typer.Option(32, help="Test images per intervention."),
    steps: int = typer.Option(50, help="DDIM steps."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Effectiveness and composition across the guidance weight omega: JSON and a PNG figure."""
    from .guidance_sweep import guidance_sweep

    def go():
        if n < 1:
            raise UserError(f"--n must be at least 1, got {n}")
        if reference not in ("null", "factual"):
            raise UserError(f"--reference must be null or factual, got {reference!r}")
        dest = Path(out or Path(checkpoint) / "guidance_sweep")
        res = guidance_sweep(checkpoint, dest, omegas=omega, reference=reference, n=n, num_steps=steps,
                             device=device, progress=not quiet)
        typer.echo(json.dumps(res["rows"], indent=2))
        typer.echo(f"wrote {dest}/guidance_sweep.json, guidance_sweep.png", err=True)

    _run(go)


# --- the service (issue 6): model registry, API keys, serve, worker ---------------------------
models_app = typer.Typer(no_args_is_help=True, help="The model registry (CDAE_HOME/models).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service.")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")


@models_app.command("list")
def models_list(all_versions: bool = typer.Option(False, "--all", help="Every version, not only the newest."),
                as_json: bool = typer.Option(False, "--json", help="JSON instead of a table.")) -> None:
    """Registered models: name, version, data set, variables."""
    from .registry import default_home, list_models

    models = list_models(all_versions=all_versions)
    if as_json:
        typer.echo(json.dumps([m.summary() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no models registered in {default_home() / 'models'}")
        return
    for m in models:
        names = ", ".join(v["name"] for v in m.summary()["variables"])
        typer.echo(f"{m.name}:v{m.version}\t{m.dataset}\t{names}\t{m.path}")


@models_app.command("register")
def models_register(checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
                    name: Optional[str] = typer.Option(None, help="Name [default: the checkpoint's data set].")) -> None:
    """Register a checkpoint directory as the newest version of NAME."""
    from .registry import register

    _run(lambda: typer.echo(register(checkpoint, name=name).ref))


@keys_app.command("create")
def keys_create(name: str = typer.Option(..., help="Who or what the key is for.")) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    import importlib

    config, db = importlib.import_module("service.config"), importlib.import_module("service.db")
    plain, key_id = db.Store(config.get_settings().database_url).create_key(name)
    typer.echo(plain)
    typer.echo(f"key {key_id} ({name}) created; send it as the X-API-Key header. It is not shown again.", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """API keys: id, name, first characters, revoked."""
    import importlib

    config, db = importlib.import_module("service.config"), importlib.import_module("service.db")
    for k in db.Store(config.get_settings().database_url).list_keys():
        typer.echo(f"{k['id']}\t{k['name']}\t{k['prefix']}...\t{'revoked' if k['revoked'] else 'active'}")


@keys_app.command("revoke")
def keys_revoke(key_id: int = typer.Argument(..., help="The key's id (see `keys list`).")) -> None:
    """Revoke an API key."""
    import importlib

    config, db = importlib.import_module("service.config"), importlib.import_module("service.db")
    if not db.Store(config.get_settings().database_url).revoke_key(key_id):
        _fail(f"no active key {key_id}")
    typer.echo(f"key {key_id} revoked")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port."),
          no_worker: bool = typer.Option(False, "--no-worker", help="The API only; workers run elsewhere."),
          queues: str = typer.Option("counterfactual,train", help="Queues of the embedded worker.")) -> None:
    """The counterfactual service: API, a worker and, with no CDAE_BROKER_URL, an embedded Redis."""
    import importlib

    importlib.import_module("service.serve").serve(host=host, port=port, worker=not no_worker, queues=queues)


@app.command()
def worker(queues: str = typer.Option("counterfactual,train", help="Comma-separated: counterfactual, train."),
           concurrency: int = typer.Option(1, help="Worker processes (one per GPU)."),
           gpu: Optional[int] = typer.Option(None, help="Use only this GPU (sets CUDA_VISIBLE_DEVICES)."),
           name: Optional[str] = typer.Option(None, help="Celery node name, e.g. gpu0@%h.")) -> None:
    """A Celery worker of the service (needs CDAE_BROKER_URL, or `cdae-med serve` on this machine)."""
    import importlib

    bad = set(queues.split(",")) - {"counterfactual", "train"}
    if bad:
        _fail(f"unknown queue(s) {sorted(bad)}; queues: counterfactual, train")
    try:
        code = importlib.import_module("service.serve").run_worker(queues, concurrency, gpu, name)
    except RuntimeError as err:
        _fail(str(err))
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
