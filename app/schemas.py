"""Request and response schemas at the API's edge; routes return these, never ORM rows."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from inspectlib import defaults


class ModelAnswer(BaseModel):
    label: str
    confidence: float
    probabilities: dict[str, float]
    latency_ms: float
    model_version: str


class LabelEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    label: str
    labelled_by: str | None
    created_at: datetime


EXAMPLE_PREDICTION = {
    "id": 42,
    "image_sha256": "9f2c" + "0" * 60,
    "image_url": "/images/9f2c" + "0" * 60,
    "created_at": "2026-11-28T07:08:38Z",
    "source": "line-3",
    "part_id": "P-0042",
    "filename": "part-0042.jpg",
    "agree": False,
    "results": {
        "baseline": {
            "label": "good",
            "confidence": 0.61,
            "probabilities": {"dent": 0.2, "good": 0.61, "scratch": 0.19},
            "latency_ms": 2.1,
            "model_version": "baseline-seed2:bd5f2a28ee6b",
        },
        "maxmin": {
            "label": "scratch",
            "confidence": 0.88,
            "probabilities": {"dent": 0.04, "good": 0.08, "scratch": 0.88},
            "latency_ms": 3.4,
            "model_version": "maxmin-seed1:071cbe25bebd",
        },
    },
    "label": None,
    "labelled_by": None,
    "labelled_at": None,
    "history": [],
    "decision": {
        "action": "review",
        "reason": "the models disagree (baseline good, maxmin scratch)",
    },
}


class DecisionPublic(BaseModel):
    action: str = Field(description="accept, reject, or review (a person decides)")
    reason: str


class PredictionPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_PREDICTION]})

    id: int
    image_sha256: str
    image_url: str
    created_at: datetime
    source: str | None
    part_id: str | None
    filename: str | None
    agree: bool
    results: dict[str, ModelAnswer]
    label: str | None = None
    labelled_by: str | None = None
    labelled_at: datetime | None = None
    history: list[LabelEventPublic] = []
    decision: DecisionPublic | None = None


class PredictionsPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"data": [EXAMPLE_PREDICTION], "count": 1}]}
    )

    data: list[PredictionPublic]
    count: int


class LabelUpdate(BaseModel):
    label: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$", examples=["scratch"])
    labelled_by: str | None = Field(
        default=None, max_length=200, pattern=r"^[^\x00]*$", examples=["inspector-anna"]
    )


class Interval(BaseModel):
    value: float | None
    low: float | None
    high: float | None


class ModelStats(BaseModel):
    accuracy: Interval
    correct: int
    labelled: int
    confusion_matrix: list[list[int]]
    latency_ms_p50: float | None
    latency_ms_p95: float | None


class PairedStats(BaseModel):
    model_a: str
    model_b: str
    accuracy_difference: Interval
    only_a_correct: int
    only_b_correct: int
    mcnemar_p_value: float


class DecisionStats(BaseModel):
    counts: dict[str, int] = Field(description="parts accepted, rejected and sent to review")
    review_rate: float | None
    good_class: str | None
    escape_rate: dict | None = Field(
        description="labelled defective parts the service accepted as good, with a 95% Wilson "
        "interval; null without a good class"
    )


class StatsPublic(BaseModel):
    since: datetime | None
    until: datetime | None
    classes: list[str]
    predictions: int
    labelled: int
    unlabelled: int
    agreement_rate: float | None
    versions: dict[str, str] | None = Field(
        description="the model versions counted (the served ones), or null for every version"
    )
    labelled_other_versions: int = Field(
        description="labelled images classified by other model versions, left out of these figures"
    )
    models: dict[str, ModelStats]
    paired: PairedStats | None
    decisions: DecisionStats | None = None


class RunSummary(BaseModel):
    id: int
    run_dir: str
    created_at: datetime
    registered_at: datetime
    served_at: datetime | None = Field(description="when an admin chose to serve it")
    serving: bool = Field(description="its models are the ones this service answers with")
    challenger_since: datetime | None = Field(
        default=None, description="since when it answers in shadow as the challenger"
    )
    verdict: str
    model_versions: dict[str, str]
    report_url: str


class RunsPublic(BaseModel):
    data: list[RunSummary]
    count: int


class RunPublic(RunSummary):
    report: dict


class Health(BaseModel):
    status: str
    detail: str | None = None
    models: dict[str, str] = {}
    run: str | None = None
    form: str | None = None  # what runs the models: "torch fp32", "onnxruntime int8", ...


class TrainingRequest(BaseModel):
    """A PoC training run on one dataset folder under the datasets directory."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"dataset": "line3-parts", "epochs": 30, "seeds": 3}]},
    )

    dataset: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="a folder name, no path; not needed with inspected=alone",
    )
    inspected: Literal["none", "alone", "merged"] = Field(
        default="none",
        description="train on the parts inspectors labelled: alone, or merged with the dataset "
        "folder; the test split then holds only labelled parts the served models never "
        "trained on",
    )
    models: list[str] = Field(default=list(defaults.MODELS), min_length=1, max_length=10)
    epochs: int = Field(default=defaults.EPOCHS, ge=1, le=defaults.EPOCHS_MAX)
    seeds: int = Field(default=defaults.SEEDS, ge=1, le=defaults.SEEDS_MAX)
    size: int = Field(
        default=defaults.SIZE,
        ge=defaults.SIZE_MIN,
        le=defaults.SIZE_MAX,
        description="input side in pixels",
    )


class TrainingProgress(BaseModel):
    stage: str  # starting, decoding, training, reporting
    epochs_done: int | None = None
    epochs_total: int | None = None
    detail: str | None = None
    eta_seconds: float | None = None
    updated_at: str | None = None


class TrainingJobPublic(BaseModel):
    id: int
    state: str  # running, done, failed, cancelled
    dataset: str
    options: dict
    requested_by: str
    created_at: datetime
    finished_at: datetime | None
    message: str | None
    run_dir: str
    report_url: str | None
    progress: TrainingProgress | None


class TrainingJobsPublic(BaseModel):
    data: list[TrainingJobPublic]
    count: int


class DatasetInfo(BaseModel):
    name: str
    classes: list[str]
    images: int
    problem: str | None = None


class DatasetsPublic(BaseModel):
    root: str
    data: list[DatasetInfo]
