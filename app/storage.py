"""Where PNGs live: a small interface and the local-directory implementation.

Workers `put` images; the API builds URLs and (for local storage) serves the files at
`GET /images/{image_id}.png`. Image ids are random (secrets.token_urlsafe), so URLs are
unguessable; they are also immutable, which lets clients cache them forever.
"""
from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Protocol

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def new_image_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def is_image_id(value: str) -> bool:
    return bool(IMAGE_ID_RE.match(value))


class Storage(Protocol):
    def put(self, image_id: str, data: bytes) -> str:
        """Store a PNG under image_id and return its public URL."""

    def get(self, image_id: str) -> bytes | None:
        """The stored PNG, or None when there is none."""

    def url(self, image_id: str) -> str:
        """Public URL of an image id."""

    def delete(self, image_id: str) -> None:
        """Remove a stored PNG (one never published); no error if absent."""


class LocalStorage:
    """PNGs in a directory shared by the API and the workers, fanned out by id prefix."""

    def __init__(self, root: Path | str, public_base_url: str):
        self.root = Path(root)
        self.public_base_url = public_base_url.rstrip("/")

    def url(self, image_id: str) -> str:
        return f"{self.public_base_url}/images/{image_id}.png"

    def path(self, image_id: str) -> Path:
        if not is_image_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")
        return self.root / image_id[:2] / f"{image_id}.png"

    def put(self, image_id: str, data: bytes) -> str:
        target = self.path(image_id)
        # Write then rename: a reader never sees a half-written file.
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
        except FileNotFoundError:   # the fan-out directory's first image (or it was removed): make it
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the API may run as another user
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.url(image_id)

    def get(self, image_id: str) -> bytes | None:
        try:
            return self.path(image_id).read_bytes()
        except (ValueError, FileNotFoundError):
            return None

    def delete(self, image_id: str) -> None:
        try:
            self.path(image_id).unlink(missing_ok=True)
        except ValueError:
            pass

    def find(self, image_id: str) -> Path | None:
        """Path of a stored image (for streaming it), or None."""
        try:
            path = self.path(image_id)
        except ValueError:
            return None
        return path if path.is_file() else None
