"""`/openapi.json` describes every REST route, with the methods the app really serves."""

from __future__ import annotations

import httpx
from starlette.routing import Route

from tests.support import RunningServer


async def test_openapi_describes_every_route(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    served: dict[str, set[str]] = {}
    for route in server.app.routes:
        if isinstance(route, Route):
            served.setdefault(route.path.replace(":path}", "}"), set()).update(
                m.lower() for m in route.methods or () if m != "HEAD"
            )
    described = {path: set(ops) for path, ops in doc["paths"].items()}
    assert described == served
    submit = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][submit["$ref"].rsplit("/", 1)[1]]
    assert {"task", "group", "callback"} <= set(schema["properties"])
    group_items = schema["properties"]["group"]["anyOf"][0]["items"]["$ref"]
    assert doc["components"]["schemas"][group_items.rsplit("/", 1)[1]]["required"] == ["task"]
    codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert {"job_not_found", "unauthenticated", "rate_limited", "unsupported_media_type"} <= set(codes)
