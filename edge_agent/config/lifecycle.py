"""The model-lifecycle sections: `audit` (the tamper-evident trail, lifecycle/audit.py) and
`shadow` (candidate bundles on live frames). Each class is its own section; both import only
config/fields.py."""

from __future__ import annotations

from pydantic import Field

from edge_agent.config.fields import ConfigPath, Section

AUDIT_FILE = "audit.jsonl"
"""The log's name in mqtt.spool_dir when `audit.path` is not set: a folder the agent must
already be able to write to, and that outlives a restart."""


class AuditModel(Section):
    """The `audit` section. The trail is always kept: a regulated line needs the record, and a
    command that cannot be recorded is refused."""

    path: ConfigPath | None = None  # None: <mqtt.spool_dir>/audit.jsonl


LIFECYCLE_DIR = "_lifecycle"
"""The folder in mqtt.spool_dir for promoted bundles and regression sets when `shadow.dir` is
not set: state the agent already writes and that outlives a restart."""


class ShadowModel(Section):
    """The `shadow` section: changing a model on a running line (edge_agent/lifecycle/). With
    `enabled`, a candidate bundle can shadow production on live frames, be promoted through
    the gates and rolled back, and archived rejects can be confirmed as defects; the commands
    and the shadow report travel on the line's MQTT link. Off, every such command is refused."""

    enabled: bool = False
    # Of production's inference time, what the candidate may use; frames beyond it are
    # counted as skipped, never queued, so production is not slowed by more than this.
    max_share: float = Field(0.25, gt=0, le=1)
    # Gate: would-be false rejects among the frames production passed, as a fraction.
    max_false_reject_rate: float = Field(0.01, ge=0, le=1)
    min_frames: int = Field(200, ge=1)  # gate: frames compared before a promotion
    window: int = Field(1000, ge=10, le=1_000_000)  # recent frames the score quantiles cover
    keep: int = Field(3, ge=1, le=100)  # bundles kept before the one in force, for rollback
    report_interval_s: float = Field(5.0, gt=0)
    dir: ConfigPath | None = None  # None: <mqtt.spool_dir>/_lifecycle
