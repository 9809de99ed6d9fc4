"""The one settings object. Every knob is an environment variable prefixed `SVFIT_`.

Defaults describe the embedded mode: a SQLite file and a filesystem queue under the data directory,
so `svfit serve` works on a fresh machine with no external server.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


# LoRA ranks: vLLM loads adapters up to rank 512 (--max-lora-rank).
DEFAULT_SERVING_LORA_RANK = 256
MAX_SERVING_LORA_RANK = 512


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SVFIT_", extra="ignore")

    data_dir: Path = Field(default=Path("./data"), description="Files, artifacts, SQLite and the embedded queue.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite under data_dir.")
    broker_url: str | None = Field(default=None, description="Celery broker; default: filesystem queue under data_dir.")
    models_dir: Path | None = Field(default=None, description="Folder of base models (one HF folder each).")

    # Where files and artifacts live (api/core/storage). S3 credentials come from the standard AWS chain
    # (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role); they are never settings here.
    storage: Literal["local", "s3"] = Field(
        default="local", description="'local': a directory under data_dir; 's3': an S3-compatible bucket."
    )
    s3_bucket: str | None = Field(default=None, description="Bucket of the store; required with storage='s3'.")
    s3_prefix: str = Field(default="", description="Key prefix inside the bucket, e.g. 'svfit/prod'.")
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible server (MinIO, Ceph, R2...); None: AWS S3."
    )
    s3_region: str | None = Field(default=None, description="Region; None: the AWS chain's (AWS_REGION...).")

    host: str = "127.0.0.1"
    port: int = 8000
    require_auth: bool | None = Field(default=None, description="None: required unless bound to loopback.")
    default_org: str = "org-local"

    max_upload_bytes: int = 512 * 1024 * 1024
    max_json_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest non-upload (JSON) request body; larger is a 413."
    )
    min_training_examples: int = 10
    upload_chunk_bytes: int = 1024 * 1024
    max_reported_line_errors: int = Field(default=20, description="Per-line errors kept in a file's status_details.")
    max_line_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1, description="Longest line an upload may hold; a longer one is a line error."
    )
    max_line_errors: int = Field(
        default=1000, ge=1, description="An upload stops being checked (status: error) after this many problems."
    )
    job_dedupe_window_s: int = Field(
        default=600, description="A retried identical job request within this window returns the existing job."
    )

    # Per API key (per organization without a key), token buckets: a full minute's worth may come at once,
    # then requests flow at the per-minute rate. 0 turns a limit off. See api/core/rate_limit.py.
    rate_limit_uploads_per_minute: int = Field(default=600, ge=0, description="POST /v1/files per key.")
    rate_limit_jobs_per_minute: int = Field(default=600, ge=0, description="POST /v1/fine_tuning/jobs per key.")
    rate_limit_inference_per_minute: int = Field(
        default=60_000, ge=0, description="Completions, chat completions and classifications per key."
    )
    rate_limit_store: Literal["auto", "memory", "redis"] = Field(
        default="auto",
        description="Where buckets live. 'auto': Redis when the broker is Redis (shared by every API process), "
        "else this process's memory.",
    )

    worker_queue: str = "cpu"
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    progress_interval_s: float = 1.0
    default_checkpoint_every: int = 50
    # What a job keeps in the store (OpenAI lists the last epochs' checkpoints): the newest epoch checkpoints
    # and the newest step checkpoint (crash recovery). Superseded ones are deleted as new ones land; 0 keeps
    # every checkpoint of that kind.
    checkpoint_keep_epochs: int = Field(default=3, ge=0)
    checkpoint_keep_steps: int = Field(default=1, ge=0)
    control_poll_interval_s: float = 0.5  # how often a running job re-reads requested_action (cancel/pause)
    max_job_attempts: int = 3  # a job whose worker died this many times fails instead of looping
    redispatch_after_s: float = Field(
        default=60.0,
        description="Queued longer than this while the queue holds fewer messages than queued jobs: enqueued "
        "again (a broker restart or a failed enqueue lost its message).",
    )

    # Serving replicas (serving/): `svfit serving` processes that hold the models, found by the API through
    # their heartbeats in the database (api/core/replicas.py). `svfit serve` runs one in its own process.
    serving_token: str | None = Field(
        default=None, description="Shared secret a serving replica requires (Authorization: Bearer); the API sends "
        "it. Required by `svfit serving` and `svfit api`; `svfit serve` makes one up for its own replica.",
    )
    serving_heartbeat_s: float = Field(default=2.0, gt=0, description="How often a replica writes its heartbeat.")
    serving_replica_ttl_s: float = Field(
        default=10.0, gt=0, description="A replica whose last heartbeat is older than this gets no more requests.",
    )
    serving_connect_timeout_s: float = Field(default=2.0, gt=0, description="Connecting to a replica.")
    serving_read_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest silence from a replica inside one answer (a model load included).",
    )
    # Chosen from benchmarks/results/serving_rank.json: on a GSM8K chat fine-tune of SmolLM2-135M (SVFit r = k,
    # all-linear) r' = 64 kept 40 % of Σ‖Δσ‖² and 64 % of the validation-loss gain, r' = 256 kept 87 % and 97 %.
    serving_lora_rank: int = Field(
        default=DEFAULT_SERVING_LORA_RANK, ge=1, le=MAX_SERVING_LORA_RANK,
        description="Rank r' of LoRA exports: the default of `peft_lora` downloads and what vLLM/SGLang replicas load.",
    )

    # The inference engine inside a replica: one engine thread owns the models.
    inference_device: str = Field(
        default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="'auto': cuda when available, else cpu."
    )
    inference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="'auto': bfloat16 on a GPU, float32 on a CPU."
    )
    inference_max_batch: int = Field(default=32, ge=1, description="Rows (sequences) decoded together per model copy.")
    inference_batch_window_ms: float = Field(
        default=5.0, ge=0, description="How long an idle engine waits for more requests before its first forward."
    )
    inference_memory_budget_mb: float = Field(
        default=8192, gt=0, description="Model copies kept loaded; least recently used ones beyond this are dropped."
    )
    inference_max_adapters: int = Field(default=256, ge=1, description="Adapters kept registered per base model copy.")
    inference_serving_rank: int | None = Field(
        default=None, ge=1, description="Serve SVFit adapters at this rank r' (largest |Δσ| kept); None: exact."
    )
    inference_max_n: int = Field(default=16, ge=1, description="Largest `n` (choices per prompt) a request may ask for.")
    inference_max_scoring_mb: float = Field(
        default=1024, gt=0,
        description="Largest logits tensor (prompt tokens × vocabulary) one echoed prompt's log probabilities may need.",
    )
    inference_threads: int | None = Field(
        default=None, ge=1, description="Torch CPU threads for inference; None: torch's default (all cores). On a "
        "CPU shared with other busy processes, fewer threads avoid OpenMP threads waiting on each other.",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'svfit.db'}"
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("SVFIT_S3_BUCKET is required when SVFIT_STORAGE=s3")
        self.s3_prefix = self.s3_prefix.strip("/")
        return self

    @property
    def embedded_queue(self) -> bool:
        return self.broker_url is None or self.broker_url.startswith("filesystem://")

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def store_dir(self) -> Path:
        """The local store, or with storage='s3' the local cache of the bucket."""
        return self.data_dir / ("store" if self.storage == "local" else "s3-cache")

    @property
    def auth_required(self) -> bool:
        if self.require_auth is not None:
            return self.require_auth
        return self.host not in {"127.0.0.1", "localhost", "::1"}


@lru_cache
def get_settings() -> Settings:
    return Settings()
