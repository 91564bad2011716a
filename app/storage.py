"""Where PNGs live: a small interface and the local-directory implementation.

Workers `put` images; the API builds URLs and (for local storage) serves the files at
`GET /images/{image_id}.png`. Image ids are random (secrets.token_urlsafe), so URLs are
unguessable; they are also immutable, which lets clients cache them forever.

The storage never reads or writes outside its root: below the root (which may itself be a link,
the operator's choice), symbolic links are never followed. Reads open the fan-out directory and
the file relative to each other with O_NOFOLLOW and serve only a regular file; writes refuse a
fan-out directory that is a link. A link planted inside the directory is "no such image".
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Protocol

NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK   # O_NONBLOCK: a FIFO planted there never blocks

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
        """Write then rename, inside the fan-out directory opened without following a link (OSError
        if it is one): a reader never sees a half-written file, and nothing lands outside the root."""
        target = self.path(image_id)
        fan_out = self._fan_out(image_id)
        tmp = f".tmp-{secrets.token_hex(8)}.png"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fan_out)
            try:
                with os.fdopen(fd, "wb") as handle:
                    os.fchmod(handle.fileno(), 0o644)   # whatever the umask: the API may run as another user
                    handle.write(data)
                os.replace(tmp, target.name, src_dir_fd=fan_out, dst_dir_fd=fan_out)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fan_out)
                raise
        finally:
            os.close(fan_out)
        return self.url(image_id)

    def _fan_out(self, image_id: str) -> int:
        """A descriptor of image_id's fan-out directory, made if missing (first image, or removed)."""
        path = self.path(image_id).parent
        try:
            return os.open(path, NO_FOLLOW | os.O_DIRECTORY)
        except FileNotFoundError:
            path.mkdir(parents=True, exist_ok=True)
            return os.open(path, NO_FOLLOW | os.O_DIRECTORY)

    def get(self, image_id: str) -> bytes | None:
        fd = self.open(image_id)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def delete(self, image_id: str) -> None:
        try:
            self.path(image_id).unlink(missing_ok=True)   # removes a link itself, never its target
        except ValueError:
            pass

    def open(self, image_id: str) -> int | None:
        """A read-only descriptor of a stored image (a regular file, reached without following any
        link below the root), or None. The caller closes it."""
        if not is_image_id(image_id):
            return None
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fan_out = os.open(image_id[:2], NO_FOLLOW | os.O_DIRECTORY, dir_fd=root)
            finally:
                os.close(root)
            try:
                fd = os.open(f"{image_id}.png", NO_FOLLOW, dir_fd=fan_out)
            finally:
                os.close(fan_out)
        except OSError:   # absent, a link (ELOOP), or not a directory
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd
