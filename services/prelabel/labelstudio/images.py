"""Fetching a task's image the way Label Studio stores it: uploads and local files on Label Studio itself
(relative URLs, sent with its token), cloud storage (``s3://``, ``gs://``, ``azure-blob://``: Label
Studio's ``/tasks/ID/presign/`` resolves them, redirecting to a presigned URL or passing the bytes
on, as Label Studio's own ML backend SDK asks it to), other URLs, and data URIs."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import aiohttp


class FetchError(Exception):
    """An image that could not be had; the message says which and why."""


CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")  # the URIs of Label Studio's cloud storages


async def fetch(session: aiohttp.ClientSession, url: str, label_studio: str, token: str, max_bytes: int,
                task: object = None) -> bytes:  # fmt: skip
    """The encoded image that ``url`` (task ``task``'s image field) names, at most ``max_bytes``."""
    if url.startswith("data:"):
        return _data_uri(url, max_bytes)
    if url.startswith(CLOUD_SCHEMES):
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        absolute = f"{label_studio.rstrip('/')}/tasks/{task}/presign/?fileuri={fileuri}"
    else:
        absolute = urljoin(label_studio.rstrip("/") + "/", url)
    if urlsplit(absolute).scheme not in ("http", "https"):
        raise FetchError(f"{url[:120]!r} is not an http(s) URL, a data URI, a cloud storage URI "
                         f"({', '.join(s + '//' for s in CLOUD_SCHEMES)}) or a path on Label Studio")  # fmt: skip
    # Label Studio's token goes only to Label Studio, never to another host a task happens to name
    # (nor to the host of a presigned URL that Label Studio redirects to: aiohttp drops it there).
    same_host = urlsplit(absolute).netloc == urlsplit(label_studio).netloc
    headers = {"Authorization": f"Token {token}"} if token and same_host else {}
    try:
        async with session.get(absolute, headers=headers) as response:
            if response.status in (401, 403) and same_host and not response.history:
                raise FetchError(
                    f"Label Studio refused the token for {absolute[:200]} (HTTP {response.status}); "
                    "give the adapter an API token with access to the project: --label-studio-token"
                )
            if response.status == 404 and url.startswith(CLOUD_SCHEMES) and not response.history:
                raise FetchError(
                    f"Label Studio could not resolve {url[:200]} (HTTP 404): the project has no cloud storage "
                    "connected for it any more, or the object is gone"
                )
            if response.status != 200:
                raise FetchError(f"{absolute[:200]} answered HTTP {response.status}")
            if (response.content_length or 0) > max_bytes:
                raise FetchError(
                    f"{absolute[:200]} is {response.content_length} bytes, over {max_bytes} bytes "
                    "(PRELABEL_MAX_IMAGE_BYTES)"
                )
            content = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                content += chunk
                if len(content) > max_bytes:
                    break
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(f"{absolute[:200]} could not be fetched: {exc or type(exc).__name__}") from None
    if len(content) > max_bytes:
        raise FetchError(f"{absolute[:200]} is over {max_bytes} bytes (PRELABEL_MAX_IMAGE_BYTES)")
    return bytes(content)


def _data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise FetchError("a data URI without a comma")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise FetchError(f"a data URI of over {max_bytes} bytes (PRELABEL_MAX_IMAGE_BYTES)")
    try:
        return base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"a data URI that is not valid base64 ({exc})") from None
