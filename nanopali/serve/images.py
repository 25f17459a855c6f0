"""Image URLs of a request -> image bytes, reading no server file and fetching nothing unless the operator allowed it.

    data:image/png;base64,...   always (and plain base64 in the task endpoints' "image" field)
    file:///path/to/image.png   only with --allow-local-images DIR, and only files whose real path (after `..`
                                and symlinks) lies inside DIR
    http(s)://...               only with --allow-remote-images (bounded in size and time)

A refused URL is an ImageAccessError (the server answers 403); a malformed one an ImageError (400). The bytes
are decoded later by the pipeline (Pali.row), which also enforces the pixel limit.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nanopali.errors import ImageError, UsageError

FETCH_TIMEOUT_S = 10


class ImageAccessError(UsageError):
    """An image URL the server's options do not allow it to read or fetch."""


@dataclass(frozen=True)
class ImagePolicy:
    local_dir: Path | None = None   # --allow-local-images: the one folder file:// URLs may read from
    remote: bool = False            # --allow-remote-images
    max_bytes: int = 20 * 2**20     # a fetched or read file larger than this is refused

    def read(self, url: str, field: str = "image_url") -> bytes:
        """The bytes of an image given as a data URL, a file:// URL or an http(s):// URL (see the module docstring)."""
        if not isinstance(url, str) or not url:
            raise ImageError(f"{field}: no image URL was given")
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            return _data_url(url, field)
        if scheme == "file":
            return self._local(url, field)
        if scheme in ("http", "https"):
            return self._remote(url, field)
        raise ImageError(f"{field}: unsupported image URL {url[:40]!r}; send the image as a data URL "
                         "(data:image/png;base64,...)")

    def _local(self, url: str, field: str) -> bytes:
        if self.local_dir is None:
            raise ImageAccessError(f"{field}: file:// images are refused; the server reads local files only when "
                                   "started with --allow-local-images DIR")
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ImageAccessError(f"{field}: file:// URLs must name a local path, not the host {parsed.netloc!r}")
        root = os.path.realpath(self.local_dir)
        path = os.path.realpath(urllib.request.url2pathname(parsed.path))  # `..` and symlinks resolved
        if os.path.commonpath([root, path]) != root:
            raise ImageAccessError(f"{field}: {parsed.path} is outside the folder --allow-local-images allows")
        if not os.path.isfile(path):
            raise ImageError(f"{field}: {parsed.path} is not a file in the allowed folder")
        if os.path.getsize(path) > self.max_bytes:
            raise ImageError(f"{field}: {parsed.path} is larger than {self.max_bytes} bytes")
        with open(path, "rb") as f:
            return f.read()

    def _remote(self, url: str, field: str) -> bytes:
        if not self.remote:
            raise ImageAccessError(f"{field}: http(s) images are refused; the server fetches images only when "
                                   "started with --allow-remote-images")
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(self.max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageError(f"{field}: fetching {url[:80]} failed: {getattr(e, 'reason', e)}") from None
        if len(data) > self.max_bytes:
            raise ImageError(f"{field}: {url[:80]} is larger than {self.max_bytes} bytes")
        return data


def _data_url(url: str, field: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ImageError(f"{field}: a data URL must be base64, like data:image/png;base64,...")
    return decode_base64(payload, field)


def decode_base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{field}: the image is not valid base64") from None
