"""An MCP client driven line by line, for the proxy's end-to-end tests.

Usage: client.py CMD ARGS...  (the MCP server to launch: `airlock mcp proxy ... -- upstream`)

It connects with the official Python SDK (`mcp`), prints one JSON line when initialized, then
reads JSON commands on stdin, each run concurrently, and prints one JSON line per answer:
  {"op": "call", "tag": T, "name": TOOL, "arguments": {...}, "progress": bool}
      -> {"tag": T, "result": CallToolResult, "progress": [messages]} or {"tag": T, "error": {...}}
  {"op": "list", "tag": T} -> {"tag": T, "tools": [names]}
  {"op": "resources", "tag": T} -> {"tag": T, "resources": [uris], "first": text of the first}
  {"op": "prompts", "tag": T} -> {"tag": T, "prompts": [names]}
End of stdin: waits for the calls in flight, then exits.
"""

import json
import os
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError


def emit(value):
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def call(session, command):
    progress = []

    async def on_progress(value, total, message):
        progress.append(message)

    try:
        result = await session.call_tool(
            command["name"],
            command.get("arguments", {}),
            progress_callback=on_progress if command.get("progress") else None,
        )
        emit({"tag": command["tag"], "result": result.model_dump(mode="json", exclude_none=True),
              "progress": progress})
    except McpError as e:
        emit({"tag": command["tag"], "error": {"code": e.error.code, "message": e.error.message}})


async def list_tools(session, command):
    result = await session.list_tools()
    emit({"tag": command["tag"], "tools": [tool.name for tool in result.tools]})


async def resources(session, command):
    listed = await session.list_resources()
    first = await session.read_resource(listed.resources[0].uri)
    emit({"tag": command["tag"], "resources": [str(r.uri) for r in listed.resources],
          "first": getattr(first.contents[0], "text", None)})


async def prompts(session, command):
    listed = await session.list_prompts()
    emit({"tag": command["tag"], "prompts": [p.name for p in listed.prompts]})


async def main():
    params = StdioServerParameters(command=sys.argv[1], args=sys.argv[2:], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            emit({"event": "initialized", "protocolVersion": init.protocolVersion,
                  "server": init.serverInfo.name,
                  "capabilities": init.capabilities.model_dump(mode="json", exclude_none=True)})
            async with anyio.create_task_group() as tasks:
                while True:
                    line = await anyio.to_thread.run_sync(sys.stdin.readline)
                    if not line:
                        break
                    command = json.loads(line)
                    if command["op"] == "call":
                        tasks.start_soon(call, session, command)
                    elif command["op"] == "list":
                        tasks.start_soon(list_tools, session, command)
                    elif command["op"] == "resources":
                        tasks.start_soon(resources, session, command)
                    elif command["op"] == "prompts":
                        tasks.start_soon(prompts, session, command)
                    else:
                        emit({"tag": command.get("tag"), "error": {"message": "unknown op"}})


anyio.run(main)
