"""What a finished job produced, beyond the archive itself: ``GET /jobs/{id}/manifest``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.routes.common import ARTIFACT_RESPONSES, ArchiveDep

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}/manifest", responses=ARTIFACT_RESPONSES,
            summary="The archive's manifest: dataset and classes, method, parameters, seed, timings, metrics")
def manifest(found: ArchiveDep) -> dict[str, Any]:
    from distill.archive import read_manifest

    return read_manifest(found[1])
