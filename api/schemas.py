"""Response (and request) models of the HTTP API: pydantic, never the SQL tables.

The ``Batch*`` models in OpenAI's section mirror OpenAI's Batch and File objects field for
field, so the official client parses them; the native models carry what a person polling a
long batch wants (progress, tokens/s, ETA).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.jsonl import find_bad_text
from specs.status import BatchStatus as BatchStatusName

# ------------------------------------------------------------------------------- native


class Counts(BaseModel):
    total: int = Field(description="items (lines) in the batch")
    completed: int
    failed: int
    pending: int = Field(description="items without a result yet")


class Tokens(BaseModel):
    prompt: int
    completion: int


class LineErrorOut(BaseModel):
    line: int | None = Field(description="1-based line of the input file; null = whole file")
    param: str | None = Field(description="the field at fault, e.g. temperature or body.model")
    code: str
    message: str


class BatchStatus(BaseModel):
    """A batch as ``GET /batches/{id}`` shows it."""

    id: str
    object: Literal["neoxq.batch"] = "neoxq.batch"
    status: str
    format: str
    endpoint: str
    model: str | None
    waiting: str | None = Field(None, description=(
        "why an unfinished batch makes no progress: no live worker serves its model "
        "(it runs once one does); null otherwise"))
    counts: Counts
    progress: float = Field(description="fraction of items with a result, 0..1")
    tokens: Tokens
    tokens_per_s: float = Field(description=(
        "generated tokens/s: while running, what the workers generate for it now (counted "
        "as tokens are generated, over the last 10 s); once finished, the run's average"))
    items_per_s: float = Field(description="tokens_per_s in items (over tokens per item)")
    eta_s: float | None = Field(description=(
        "seconds to go: the tokens left (pending items x tokens per item so far, minus "
        "those in flight) at tokens_per_s; null while nothing is generating"))
    created_at: float
    in_progress_at: float | None
    finalizing_at: float | None
    completed_at: float | None
    failed_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None
    expires_at: float | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    defaults: dict[str, Any]
    metadata: dict[str, Any]
    errors: list[LineErrorOut] | None = Field(description="why the file was refused")


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchStatus]
    has_more: bool
    first_id: str | None
    last_id: str | None


class WorkerOut(BaseModel):
    """A worker as registered in the store and refreshed by its heartbeat."""

    id: str
    host: str
    pid: int
    model: str = Field(description="the model name it serves (batches naming it run here)")
    checkpoint: str | None = Field(None, description="what it loaded for that name")
    dtype: str | None = None
    devices: list[Any]
    pipeline_parallel: int
    status: str
    started_at: float
    last_seen: float
    tokens_per_s: float
    items_done: int
    tokens_done: int
    prefix_cache_hit_rate: float = Field(
        0.0, description="prompt tokens found in the engine's prefix cache / looked up")
    warmup_seconds: float | None = Field(
        None, description="how long its engine's warm-up took before it took work "
                          "(status 'warming' meanwhile)")


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerOut]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    redis: str
    workers: int = Field(description="workers alive now (heartbeat within dead_worker_after, "
                                     "not stopped)")


# ------------------------------------------------------------------------------- OpenAI


class FileObject(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchErrorData(BaseModel):
    code: str | None
    message: str | None
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorData]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    """OpenAI's batch ``usage``: tokens so far."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(
        default_factory=lambda: {"reasoning_tokens": 0})


class OpenAIBatch(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatusName
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage | None = None


class OpenAIBatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class CreateBatchRequest(BaseModel):
    """``POST /v1/batches``'s body, as the openai client sends it."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _storable_text(self) -> CreateBatchRequest:
        # JSON can escape a lone surrogate or NUL ("\ud800", "\u0000") that no database
        # column can hold: refuse it here, before any lookup or insert sees it.
        bad = find_bad_text(self.model_dump())
        if bad is not None:
            raise ValueError(f"{bad[0]}: {bad[1]}")
        return self


class ModelObject(BaseModel):
    """A model as OpenAI's ``/v1/models`` shows it, with what neoxq knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: str = Field(description="base, or fine-tuned (a job's result)")
    parent: str | None = Field(None, description="a fine-tuned model's base")
    checkpoint: str | None = Field(None, description="what workers load for this name")
    workers: int = Field(description="live workers serving it now")
    dtypes: list[str] = Field(default_factory=list, description="their dtypes")
    pipeline_parallel: list[int] = Field(default_factory=list,
                                         description="their pipeline sizes")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# ------------------------------------------------------------------------ fine-tuning


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; ``"auto"`` leaves the choice to the trainer
    (``neoxq finetune``'s defaults), which records what it used once the job runs."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=1000)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=65536)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=1000)] = "auto"


class NeoxqTrainingOptions(BaseModel):
    """neoxq's own options, under ``method.neoxq`` (``neoxq finetune``'s flags)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters on a frozen "
                                            "base, or every weight (DeepSpeed ZeRO)")
    lora_rank: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: str = Field("query_key_value", min_length=1, max_length=200,
                              description="comma-separated linears, or all")
    max_length: int | None = Field(None, ge=2, le=1_000_000,
                                   description="tokens per packed row (default: "
                                   "min(2048, the model's context))")
    max_steps: int | None = Field(None, ge=1, description="train exactly this many steps "
                                  "(overrides n_epochs)")
    overlong: Literal["error", "truncate", "split"] = "error"
    zero_stage: Literal[0, 1, 2, 3] | None = None
    offload: bool = False
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (a trainer "
                            "that dies resumes from the last one)")
    log_every: int = Field(1, ge=1, description="a metrics event every N steps")
    dtype: Literal["bfloat16", "float16", "float32"] | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class FineTuningMethod(BaseModel):
    """OpenAI's ``method`` (``supervised`` only) with neoxq's options beside it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None
    neoxq: NeoxqTrainingOptions | None = None


class CreateFineTuningJobRequest(BaseModel):
    """``POST /v1/fine_tuning/jobs``'s body, as the openai client sends it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    # Part of the result's name ft:BASE:SUFFIX:JOBID, so no ':' (nor anything odd).
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by "
                                                    "OpenAI in favour of method")
    method: FineTuningMethod | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None

    @model_validator(mode="after")
    def _storable_text(self) -> CreateFineTuningJobRequest:
        bad = find_bad_text(self.model_dump())
        if bad is not None:
            raise ValueError(f"{bad[0]}: {bad[1]}")
        if self.integrations:
            raise ValueError("integrations: none are supported (neoxq logs metrics as "
                             "events; `neoxq finetune --wandb` for Weights & Biases)")
        return self


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobMethod(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: dict[str, Any]
    neoxq: dict[str, Any]


class FineTuningJobObject(BaseModel):
    """OpenAI's ``fine_tuning.job`` object."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: JobMethod
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobObject]
    has_more: bool


class FineTuningEventObject(BaseModel):
    """OpenAI's ``fine_tuning.job.event``: a message, or a training step's ``metrics``."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEventObject]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class FineTuningCheckpointObject(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint``."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
