"""The `tuneloop` command. Each command imports its heavy parts lazily, so `serve` never loads torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.bus import announce_model_event
from tuneloop.config import Settings, load_settings
from tuneloop.errors import Conflict, DataError, ExitCode, NothingToTrain, RegistryError, RunWithdrawn
from tuneloop.events import ModelEvent
from tuneloop.registry import Registry
from tuneloop.rollout_stage import CANARY, STAGES

app = typer.Typer(help="Serve a LoRA-tuned text classifier as int8 ONNX and keep it tuned.", no_args_is_help=True)
console = Console()


def _registry() -> Registry:
    return Registry.from_config(load_settings().registry)


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
    registry = Registry.from_config(settings.registry)
    if if_empty and registry.live_version() is not None:
        console.print(f"registry {registry.location} already serves v{registry.live_version()}; nothing to do")
        return
    started = time.perf_counter()
    from pipeline.versions import build_v1

    try:
        built = build_v1(settings, registry, data, labels.split(",") if labels else None, progress, console.print)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(exc.exit_code) from None
    manifest, result = built.manifest, built.run.result
    table = Table(title=f"published v{manifest.version} to {registry.location}", show_header=False)
    parity = manifest.metrics["parity"]
    for key, value in (
        ("epochs (best)", f"{len(result.epochs)} ({result.best_epoch})"),
        ("device", f"{result.device} ({result.precision})"),
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
def train(
    run_id: Annotated[int | None, typer.Option(
        help="Run the controller's training run N (claimed by a worker): beat while training, record its end.")] = None,
    replay_ratio: Annotated[
        float | None, typer.Option(help="Replayed older rows per new row. Default: train.replay_ratio.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    standby: Annotated[bool, typer.Option(
        help="Import what training needs, then wait for a line '<run id> <unix time the run started>' on stdin and "
        "run it (a worker's standby, trigger.standby_command); the end of stdin ends it.")] = False,
) -> None:
    """Fine-tune the live version on new feedback plus replay; export, gate; promote (or start the rollout) if it passes.

    Exit codes: 0 promoted or rollout started, 3 rejected by the gate (kept in the registry, never served),
    2 nothing to do (too little new data, or a rollout in progress).
    """
    settings = load_settings()
    started = time.perf_counter()
    from trainer.priority import yield_cpu

    yield_cpu(settings.train.niceness)  # serving on this host comes first
    from pipeline.versions import build_candidate

    if standby:
        console.print(f"standby: ready in {time.perf_counter() - started:.1f} s; waiting for a run")
        line = sys.stdin.readline()
        if not line.strip():
            return  # its worker stopped
        run, run_started_unix = line.split()
        run_id, waited = int(run), max(0.0, time.time() - float(run_started_unix))
        started = time.perf_counter() - waited  # the time budget counts from the run's start
        console.print(f"run {run_id}: handed to this standby {waited:.1f} s after it started")
    if run_id is None:
        _train(settings, build_candidate, replay_ratio, progress, started)
        return

    from tuneloop.runs import RunQueue, heartbeats

    queue = RunQueue(settings.controller.store_url)

    publishing = threading.Event()

    def withdrawn() -> None:  # from the heartbeat thread
        if publishing.is_set():  # the fence passed: the version is the run's, half a publish would help nobody
            console.print(f"[yellow]training run {run_id} was marked failed while publishing[/yellow]")
            return
        console.print(f"[red]training run {run_id} was withdrawn[/red] (no heartbeat reached the store in time); "
                      "stopping, nothing published")
        os._exit(ExitCode.FAILED)

    def fence() -> None:
        if not queue.heartbeat(run_id):
            raise RunWithdrawn(f"training run {run_id} was withdrawn before publishing; nothing published")
        publishing.set()

    code: int = ExitCode.FAILED
    try:
        with heartbeats(queue, run_id, settings.trigger.heartbeat_timeout_s, withdrawn):
            try:
                _train(settings, build_candidate, replay_ratio, progress, started, run_id, fence)
                code = ExitCode.OK
            except typer.Exit as exc:
                code = exc.exit_code
                raise
    except RunWithdrawn as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    finally:
        _record_end(queue, run_id, code)


def _record_end(queue: Any, run_id: int, code: int, tries: int = 5) -> None:
    """The run's end, recorded by the run itself (its worker may be gone); the store may be restarting."""
    for attempt in range(tries):
        try:
            queue.finish_by_exit_code(run_id, code)
            return
        except Exception as exc:  # noqa: BLE001 - the store's errors, reported and tried again
            console.print(f"[yellow]warning:[/yellow] the end of run {run_id} not recorded ({exc}); trying again")
            time.sleep(2 * (attempt + 1))


def _train(settings: Settings, build_candidate: Callable[..., Any], replay_ratio: float | None, progress: bool,
           started: float, run_id: int | None = None, fence: Callable[[], None] | None = None) -> None:
    try:
        built = build_candidate(settings, Registry.from_config(settings.registry), run_id, replay_ratio, progress,
                                console.print, started, fence)
    except NothingToTrain as exc:
        console.print(f"[yellow]nothing to train:[/yellow] {exc}")
        raise typer.Exit(exc.exit_code) from None
    for warning in built.warnings:
        console.print(f"[yellow]warning:[/yellow] model event not published ({warning})")
    manifest, result = built.manifest, built.run.result
    table = Table(title=f"v{manifest.version} {built.outcome} (parent v{built.run.live.version})")
    table.add_column("check")
    table.add_column("passed")
    table.add_column("figures")
    for name, check in manifest.gate["checks"].items():
        figures = {k: v for k, v in check.items() if k != "passed"}
        table.add_row(name, "yes" if check["passed"] else "[red]no[/red]", json.dumps(figures)[:160])
    console.print(table)
    console.print(f"epochs {len(result.epochs)} of {result.planned_epochs} planned, {result.steps} of "
                  f"{result.planned_steps} steps (best epoch {result.best_epoch}) on "
                  f"{result.device} ({result.precision}), {result.train_samples_per_second:.0f} samples/s; training {result.seconds:.0f} s, "
                  f"took {time.perf_counter() - started:.0f} s")
    if not built.accepted:
        raise typer.Exit(ExitCode.REJECTED)


def _announce(settings: Settings, action: str, version: int, previous: int | None, reason: str = "") -> None:
    """Tell the replicas on the model topic; they also watch the registry, so a lost event only delays a swap."""
    event = ModelEvent(action=action, version=version, previous=previous, reason=reason)
    problem = announce_model_event(settings.events, event)
    if problem:
        console.print(f"[yellow]warning:[/yellow] model event not published ({problem})")


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
    from tuneloop.database import redact

    settings = load_settings()
    bus = settings.events.kafka_bootstrap_servers or f"embedded log {settings.events.embedded_path}"
    console.print(
        f"controller: {bus} -> {redact(settings.controller.store_url)}; "
        f"metrics on http://{settings.controller.host}:{settings.controller.port}/metrics"
    )
    try:
        serve_controller(settings)
    except Conflict as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(exc.exit_code) from None


@app.command()
def trainer(
    keep_warm: Annotated[bool, typer.Option(
        help="Keep a standby training process warm (trigger.standby_command), so a claimed run starts without "
        "importing torch first.")] = True,
) -> None:
    """Claim the training runs the controller requests and run them on this host (a GPU one, beside the same store,
    registry and event bus); set trigger.local_worker false on the controller. Stops on SIGTERM or Ctrl-C; a run in
    progress goes on and records its own end (in a container it ends with the container: the run fails by its
    missing heartbeat)."""
    import signal

    from tuneloop.database import redact
    from tuneloop.runs import RunQueue
    from tuneloop.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = Worker(settings.trigger, RunQueue(settings.controller.store_url))
    console.print(f"trainer {worker.name}: runs requested in {redact(settings.controller.store_url)}; "
                  f"logs in {settings.trigger.runs_dir}")
    try:
        worker.run(stop, keep_warm)
    except KeyboardInterrupt:
        pass


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
        raise typer.Exit(ExitCode.FAILED) from None
    if response.status_code != 202:
        console.print(f"[red]not started ({response.status_code}):[/red] {response.json().get('detail', response.text)}")
        raise typer.Exit(ExitCode.FAILED)
    body = response.json()
    console.print(f"training run {body['run_id']} requested: {body['detail']}")


@app.command()
def rollback(
    to: Annotated[int | None, typer.Option("--to", help="Version to serve. Default: the one served before the live one.")] = None,
    reason: Annotated[str, typer.Option(help="Recorded in the history.")] = "manual rollback (CLI)",
) -> None:
    """Serve an earlier version again; every replica swaps to it within serve.watch_interval_s."""
    settings = load_settings()
    try:
        live, target = Registry.from_config(settings.registry).rollback(to, reason)
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    if target == live:
        console.print(f"v{live} is already served; nothing to do")
        return
    _announce(settings, "rollback", target, live, reason)
    console.print(f"rolled back v{live} -> v{target}")


rollout_app = typer.Typer(help="A candidate in shadow or canary next to the live version.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("status")
def rollout_status() -> None:
    """The candidate in shadow or canary, if any, and since when."""
    rollout = _registry().rollout()
    if rollout is None:
        console.print("no rollout in progress")
        return
    share = f" on {rollout.share:.0%} of texts" if rollout.stage == CANARY else ""
    console.print(f"v{rollout.version} in {rollout.stage}{share} since {rollout.stage_started_at} "
                  f"(live v{rollout.live}; rollout started {rollout.started_at})")


@rollout_app.command("start")
def rollout_start(
    version: Annotated[int, typer.Argument(help="An accepted version that is not the live one.")],
    stage: Annotated[str, typer.Option(help="shadow or canary.")] = "shadow",
    share: Annotated[float | None, typer.Option(help="Canary's share of texts. Default: rollout.canary_share.")] = None,
) -> None:
    """Put a version in shadow or canary by hand; the controller judges it on live feedback from then on."""
    settings = load_settings()
    if stage not in STAGES:
        console.print(f"[red]error:[/red] --stage is shadow or canary, not {stage!r}")
        raise typer.Exit(ExitCode.NOTHING_TO_DO)
    registry = Registry.from_config(settings.registry)
    try:
        rollout = registry.start_rollout(version, stage, share or settings.rollout.canary_share, "manual (CLI)")
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    _announce(settings, stage, version, rollout.live, "manual (CLI)")
    console.print(f"v{version} in {stage} next to live v{rollout.live}")


@rollout_app.command("promote")
def rollout_promote(reason: Annotated[str, typer.Option(help="Recorded in the history.")] = "manual (CLI)") -> None:
    """Make the candidate the live version now, without waiting for the controller's verdict."""
    _end_rollout(promote=True, reason=reason)


@rollout_app.command("withdraw")
def rollout_withdraw(reason: Annotated[str, typer.Option(help="Recorded in the history.")] = "manual (CLI)") -> None:
    """Withdraw the candidate; the live version answers everything again."""
    _end_rollout(promote=False, reason=reason)


@rollout_app.command("abort", hidden=True, deprecated=True)
def rollout_abort(reason: Annotated[str, typer.Option(help="Recorded in the history.")] = "manual (CLI)") -> None:
    """Deprecated name of `tuneloop rollout withdraw`, accepted for one release."""
    console.print("[yellow]warning:[/yellow] `tuneloop rollout abort` is now `tuneloop rollout withdraw`; abort goes in the next release")
    _end_rollout(promote=False, reason=reason)


def _end_rollout(promote: bool, reason: str) -> None:
    settings = load_settings()
    try:
        rollout = Registry.from_config(settings.registry).end_rollout(promote, reason)
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    _announce(settings, "promote" if promote else "withdraw", rollout.version, rollout.live, reason)
    console.print(f"v{rollout.version} {'promoted' if promote else 'withdrawn'}; live was v{rollout.live}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's registry, logs and plot go.")] = Path("var/demo"),
    feedback_per_intent: Annotated[int, typer.Option(help="Labelled feedback rows per new intent.")] = 20,
    epochs: Annotated[int | None, typer.Option(help="Most training epochs. Default: train.max_epochs.")] = None,
) -> None:
    """Run the reference scenario end to end (CLINC150 domain shift) and plot it: demo.png, demo.json."""
    from cli.demo import plot, run_demo, summary_rows

    started = time.perf_counter()
    result = run_demo(workdir, feedback_per_intent, epochs, say=console.print)
    console.print("4/4 writing the plot and the summary")
    (workdir / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, workdir / "demo.png")
    table = Table(title=f"tuneloop demo ({time.perf_counter() - started:.0f} s)", show_header=False)
    for key, value in summary_rows(result):
        table.add_row(key, value)
    console.print(table)
    console.print(f"plot: {workdir / 'demo.png'}")


@app.command()
def history() -> None:
    """Which version served from when (promotions, rollbacks, shadow and canary stages), then every version's verdict."""
    registry = _registry()
    # promote/rollback: `version` serves everyone from then on, replacing `live before`;
    # shadow/canary: `version` runs next to the live one; withdraw: it stops.
    table = Table("from", "action", "version", "live before", "reason", title="served")
    for entry in registry.history():
        previous = f"v{entry.previous}" if entry.previous else "-"
        table.add_row(entry.time, entry.action, f"v{entry.version}", previous, entry.reason)
    console.print(table)
    rollout = registry.rollout()
    versions = Table("version", "created", "parent", "status", title="versions")
    versions.add_column("failed checks", overflow="fold")
    live = registry.live_version()
    for version in registry.list_versions():
        manifest = registry.manifest(version)
        failed = [name for name, check in manifest.gate.get("checks", {}).items() if not check.get("passed")]
        status = manifest.status + (" (live)" if version == live else "")
        if rollout is not None and version == rollout.version:
            status += f" ({rollout.stage})"
        parent = f"v{manifest.parent_version}" if manifest.parent_version else "-"
        versions.add_row(f"v{version}", manifest.created_at, parent, status, ", ".join(failed) or "-")
    console.print(versions)


@app.command()
def verify(version: Annotated[int | None, typer.Argument(help="Default: the live version.")] = None) -> None:
    """Check every file of a version against its manifest's sha256."""
    try:
        manifest, directory = _registry().resolve(version)
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    console.print(f"v{manifest.version} at {directory}: {len(manifest.files)} files verified")


CONFIG_TABLE_START = "<!-- config-table: generated by `tuneloop config-table --readme README.md` from tuneloop/config.py -->"
CONFIG_TABLE_END = "<!-- config-table: end -->"


def readme_with_config_table(readme: str, table: str) -> str:
    """`readme` with the text between the config-table markers replaced by `table`."""
    start, end = readme.index(CONFIG_TABLE_START) + len(CONFIG_TABLE_START), readme.index(CONFIG_TABLE_END)
    return f"{readme[:start]}\n{table}\n{readme[end:]}"


@app.command("config-table")
def config_table(
    readme: Annotated[Path | None, typer.Option(help="Replace the table between the markers in this file.")] = None,
) -> None:
    """Print the configuration reference (every key, its default and meaning) as a markdown table."""
    from tuneloop.config import config_table as table

    if readme is None:
        print(table())
        return
    readme.write_text(readme_with_config_table(readme.read_text(), table()))
    console.print(f"{readme}: configuration table updated")


def main() -> None:
    logging.basicConfig(level=os.environ.get("TUNELOOP_LOG_LEVEL", "WARNING"))
    app()
