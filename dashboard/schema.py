"""The HTTP API's own small models. The document itself (Snapshot, StreamedSnapshot) is the typed model
of daemon/document.py: the OpenAPI schema is generated from it; the names here are kept for importers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from accept_watch.daemon.document import SCHEMA_ID, Document, StreamedDocument

Snapshot = Document
StreamedSnapshot = StreamedDocument
__all__ = ["SCHEMA_ID", "ErrorDetail", "Health", "Snapshot", "StreamedSnapshot"]


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    detail: str
