"""Changes for the handler tests: one task carrying every kind of credential (spec §1)."""

from __future__ import annotations

from typing import Any

from consumer import PhaseChange
from consumer.core.change import ChangeRecord

# Each must never leave phasewatch, in any handler's output.
CREDENTIALS = (
    "ENCKEY-s3cr3t",
    "PINATA-JWT-s3cr3t",
    "PINATA-APISECRET-s3cr3t",
    "HDR-AUTH-s3cr3t",
    "HDR-APIKEY-s3cr3t",
    "AKIA-ACCESS-KEY",
    "S3-SECRET-s3cr3t",
    "s3cr3t",
)


def credentialed_task(
    task_id: str = "task-1", phase: str = "failed", task_type: str = "upload"
) -> dict[str, Any]:
    storage = "s3+https://AKIA-ACCESS-KEY:S3-SECRET-s3cr3t@storage.example/bucket"
    return {
        "id": task_id,
        "type": task_type,
        "createdAt": 1_700_000_000_000,
        "inputAssetId": "asset-in",
        "outputAssetId": "asset-out",
        "projectId": "project-1",
        "params": {
            "upload": {
                "url": "https://example.com/in.mp4",
                "encryption": {"encryptedKey": "ENCKEY-s3cr3t"},
            },
            "export": {
                "custom": {
                    "url": "https://hooks.example/x",
                    "method": "POST",
                    "headers": {
                        "Authorization": "Bearer HDR-AUTH-s3cr3t",
                        "X-Api-Key": "HDR-APIKEY-s3cr3t",
                    },
                },
                "ipfs": {
                    "pinata": {"jwt": "PINATA-JWT-s3cr3t", "apiSecret": "PINATA-APISECRET-s3cr3t"}
                },
            },
            "transcode-file": {
                "input": {"url": "https://example.com/in.mp4"},
                "storage": {"url": storage},
            },
        },
        "status": {
            "phase": phase,
            "updatedAt": 1_700_000_001_000,
            "progress": 0.5,
            "retries": 2,
            # Userinfo also leaks into free text, which the summary does carry.
            "errorMessage": f"upload to {storage} failed: 403",
        },
    }


def make_change(
    *,
    seq: int = 7,
    phase: str = "failed",
    previous: str | None = "running",
    task_type: str = "upload",
    task_id: str = "task-1",
    kind: str = "phase",
    attempt: int = 1,
    handler: str = "test-handler",
    replay_run: str | None = None,
    event_id: str | None = None,
) -> PhaseChange:
    """The change ``handler`` receives (a replay in run ``replay_run`` when given);
    the event id defaults to ``evt-<seq>``."""
    assert kind in ("phase", "update")
    record = ChangeRecord(
        seq,
        task_id,
        f"evt-{seq}" if event_id is None else event_id,
        previous,
        phase,
        1_700_000_001_000,
        1_700_000_002_000,
        credentialed_task(task_id, phase, task_type),
        kind,
    )
    return PhaseChange.from_record(record, handler=handler, attempt=attempt, replay_run=replay_run)


def assert_no_credentials(data: bytes | str) -> None:
    text = data.decode() if isinstance(data, bytes) else data
    for credential in CREDENTIALS:
        assert credential not in text, f"credential {credential!r} leaked"
