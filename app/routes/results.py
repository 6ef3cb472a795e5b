"""What a finished job produced, beyond the archive itself: ``GET /jobs/{id}/manifest``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from app.routes.jobs import ARTIFACT_RESPONSES, finished_archive
from workers.models import Job

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}/manifest", responses=ARTIFACT_RESPONSES,
            summary="The archive's manifest: dataset and classes, method, parameters, seed, timings, metrics")
def manifest(found: Annotated[tuple[Job, Path], Depends(finished_archive)]) -> dict[str, Any]:
    from distill.archive import read_manifest

    return read_manifest(found[1])
