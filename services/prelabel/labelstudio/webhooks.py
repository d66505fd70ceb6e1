"""Giving Label Studio's webhook the basic auth header it lacks.

Connecting an ML backend makes Label Studio create a webhook to ``<backend>/webhook`` that sends no
basic auth, even when the backend object has it: with ``--basic-auth`` every annotation event would
be refused. After ``/setup`` the adapter finds that webhook through Label Studio's API (with the
project's token) and sets the header, so that connecting stays one step for a team.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

log = logging.getLogger("prelabel.labelstudio")


async def authorize(session: aiohttp.ClientSession, url: str, token: str, project: str, user: str,
                    header: str) -> int:  # fmt: skip
    """Set ``Authorization: header`` on the project's webhooks to backends that use basic auth as ``user``;
    returns how many such webhooks there are (0: none yet, Label Studio creates it just after /setup)."""
    auth = {"Authorization": f"Token {token}"}

    async def get(path: str) -> Any:
        async with session.get(f"{url}{path}", headers=auth) as response:
            response.raise_for_status()
            return await response.json(content_type=None)

    backends = await get(f"/api/ml?project={project}")
    ours = {f"{b['url'].rstrip('/')}/webhook" for b in backends
            if b.get("auth_method") == "BASIC_AUTH" and b.get("basic_auth_user") == user}  # fmt: skip
    found = 0
    for hook in await get(f"/api/webhooks?project={project}"):
        if hook.get("url", "").rstrip("/") not in ours:
            continue
        found += 1
        if (hook.get("headers") or {}).get("Authorization") != header:
            headers = {**(hook.get("headers") or {}), "Authorization": header}
            async with session.patch(f"{url}/api/webhooks/{hook['id']}", json={"headers": headers},
                                     headers=auth) as response:  # fmt: skip
                response.raise_for_status()
            log.info("project %s: gave Label Studio's webhook %s the basic auth header", project, hook["url"])
    return found
