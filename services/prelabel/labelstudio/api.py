"""Label Studio's REST API as the adapter calls it: JSON with the project's token."""

from __future__ import annotations

from typing import Any

import aiohttp


class StudioError(RuntimeError):
    """Label Studio answered something other than success; the message says what it said."""


async def call(session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Token {token}"} if token else {}
    async with session.request(method, url, headers=headers, json=body) as response:
        if response.status >= 300:
            raise StudioError(f"Label Studio answered HTTP {response.status} to {method} {url}: "
                              f"{(await response.text())[:200]}")  # fmt: skip
        return await response.json(content_type=None)
