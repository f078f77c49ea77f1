"""The `tuneloop` command. Each command imports its heavy parts lazily, so `serve` never loads torch."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.config import load_settings
from tuneloop.registry import Registry, RegistryError

app = typer.Typer(help="Serve a LoRA-tuned text classifier as int8 ONNX and keep it tuned.", no_args_is_help=True)
console = Console()


def _registry() -> Registry:
    return Registry(load_settings().registry.path)


@app.command()
def bootstrap(
    data: Annotated[Path, typer.Option(help="CSV with the columns text,label.")],
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated label set, may name labels the data lacks yet.")
    ] = None,
    if_empty: Annotated[bool, typer.Option(help="Do nothing when the registry already serves a version.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train model v1 (LoRA), export it as int8 ONNX, check parity and publish it."""
    settings = load_settings()
    registry = Registry(settings.registry.path)
    if if_empty and registry.current_version() is not None:
        console.print(f"registry {registry.root} already serves v{registry.current_version()}; nothing to do")
        return
    started = time.perf_counter()
    from exporters.build import build_and_publish
    from trainer import data as datasets
    from trainer.model import add_lora, build_classifier, load_tokenizer, resolve_base
    from trainer.train import fit

    try:
        rows = datasets.load_csv(data)
        label_names = datasets.label_set(rows, labels.split(",") if labels else None)
    except datasets.DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    train_rows, val_rows = datasets.split(rows, settings.train.val_fraction, settings.train.seed)
    base = resolve_base(settings.model)
    console.print(
        f"bootstrap: {len(train_rows)} train / {len(val_rows)} validation rows, "
        f"{len(label_names)} labels, base {base.model_id}"
    )
    tokenizer = load_tokenizer(base)
    model = add_lora(build_classifier(base, len(label_names), settings.model), settings.train)
    result = fit(model, tokenizer, train_rows, val_rows, label_names, settings.train, settings.model.max_seq_length, progress)
    training = rows.source | {
        "split_seed": settings.train.seed,
        "val_fraction": settings.train.val_fraction,
        "train_rows": len(train_rows),
        "device": result.device,
        "epochs_run": len(result.epochs),
        "best_epoch": result.best_epoch,
        "train_samples_per_second": round(result.train_samples_per_second, 1),
        "lora": settings.train.model_dump(include={"lora_r", "lora_alpha", "lora_dropout", "target_modules"}),
    }
    manifest = build_and_publish(
        registry, result.model, tokenizer, label_names, base, val_rows, settings, training, progress=progress
    )
    table = Table(title=f"published v{manifest.version} to {registry.root}", show_header=False)
    parity = manifest.metrics["parity"]
    for key, value in (
        ("epochs (best)", f"{len(result.epochs)} ({result.best_epoch})"),
        ("device", result.device),
        ("validation accuracy, PyTorch", f"{manifest.metrics['val_accuracy_torch']:.4f}"),
        ("validation accuracy, int8 ONNX", f"{manifest.metrics['val_accuracy_onnx']:.4f}"),
        ("argmax agreement / max |Δlogit|", f"{parity['argmax_agreement']:.4f} / {parity['max_abs_logit_diff']:.4f}"),
        ("quantization", manifest.export["quantization"]),
        ("model size", f"{manifest.metrics['model_bytes'] / 1e6:.1f} MB (fp32 {manifest.metrics['fp32_model_bytes'] / 1e6:.1f} MB)"),
        ("took", f"{time.perf_counter() - started:.0f} s"),
    ):
        table.add_row(key, value)
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Default: serve.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: serve.port.")] = None,
) -> None:
    """Start the BentoML service (`bentoml serve services.service:Classifier`)."""
    settings = load_settings()
    bentoml = shutil.which("bentoml") or str(Path(sys.executable).with_name("bentoml"))
    args = [bentoml, "serve", "services.service:Classifier", "--host", host or settings.serve.host]
    args += ["--port", str(port or settings.serve.port)]
    os.execv(bentoml, args)


@app.command()
def controller() -> None:
    """Consume prediction and feedback events into the feedback store; /metrics on controller.port."""
    from monitoring.controller import serve_controller

    settings = load_settings()
    bus = settings.events.kafka_bootstrap_servers or f"embedded log {settings.events.embedded_path}"
    console.print(
        f"controller: {bus} -> {settings.controller.store_path}; "
        f"metrics on http://{settings.controller.host}:{settings.controller.port}/metrics"
    )
    serve_controller(settings)


@app.command()
def trigger(
    reason: Annotated[str, typer.Option(help="Recorded with the decision and the run.")] = "manual (CLI)",
    url: Annotated[str | None, typer.Option(help="Controller base URL. Default: controller.host and port.")] = None,
) -> None:
    """Ask the running controller to start a training run now (needs controller.admin_token)."""
    import httpx

    settings = load_settings()
    base = url or f"http://{settings.controller.host}:{settings.controller.port}"
    token = settings.controller.admin_token.get_secret_value()
    try:
        response = httpx.post(
            f"{base}/admin/trigger", json={"reason": reason}, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] no controller answered at {base} ({exc}); start it with `tuneloop controller`")
        raise typer.Exit(1) from None
    if response.status_code != 202:
        console.print(f"[red]not started ({response.status_code}):[/red] {response.json().get('detail', response.text)}")
        raise typer.Exit(1)
    body = response.json()
    console.print(f"training run {body['run_id']} started: {body['detail']}")


@app.command()
def history() -> None:
    """Every promotion and rollback, oldest first."""
    registry = _registry()
    table = Table("time", "action", "version", "previous", "reason")
    for entry in registry.history():
        previous = f"v{entry.previous}" if entry.previous else "-"
        table.add_row(entry.time, entry.action, f"v{entry.version}", previous, entry.reason)
    console.print(table)


@app.command()
def verify(version: Annotated[int | None, typer.Argument(help="Default: the current version.")] = None) -> None:
    """Check every file of a version against its manifest's sha256."""
    try:
        manifest, directory = _registry().resolve(version)
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"v{manifest.version} at {directory}: {len(manifest.files)} files verified")


def main() -> None:
    logging.basicConfig(level=os.environ.get("TUNELOOP_LOG_LEVEL", "WARNING"))
    app()
