"""What a finished job produced, beyond the archive itself: ``GET /jobs/{id}/manifest``, and ``HEAD`` on the
archive (its size, ETag and digest without the bytes)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from app.routes.jobs import ARTIFACT_RESPONSES, ArchiveDep, download_artifact

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}/manifest", responses=ARTIFACT_RESPONSES,
            summary="The archive's manifest: dataset and classes, method, parameters, seed, timings, metrics")
def manifest(found: ArchiveDep) -> dict[str, Any]:
    from distill.archive import read_manifest

    return read_manifest(found[1])


@router.head("/jobs/{job_id}/artifact", response_class=Response, responses={
    200: {"description": "the archive's headers: Content-Length, ETag, Repr-Digest, Accept-Ranges"},
    **ARTIFACT_RESPONSES}, summary="The archive's size and digest, without its bytes")
def artifact_headers(
    found: ArchiveDep,
    if_none_match: Annotated[str | None, Header(max_length=4096, description="ETags already held: 304 if one matches")] = None,
) -> Response:
    return download_artifact(found, if_none_match)  # a file response sends only its headers to HEAD
