"""A small MCP server (official Python SDK) for the proxy's fault tests.

Tools: `mark` appends its `note` to the file named by MARK_FILE and returns it; `slow` marks,
then sleeps `seconds`; `crash` exits the process mid-call; `garbage` writes a line that is not
JSON-RPC to stdout before answering.
"""

import os
import sys
import time

from mcp.server.fastmcp import FastMCP

server = FastMCP("airlock-test")


def mark(note: str) -> None:
    with open(os.environ["MARK_FILE"], "a", encoding="utf-8") as f:
        f.write(note + "\n")


@server.tool(name="mark")
def mark_tool(note: str) -> str:
    mark(note)
    return f"marked {note}"


@server.tool()
def slow(note: str, seconds: float) -> str:
    mark(note)
    time.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def crash(note: str) -> str:
    mark(note)
    sys.stdout.flush()
    os._exit(3)


@server.tool()
def garbage(note: str) -> str:
    sys.stdout.write("{this is not json-rpc\n")
    sys.stdout.flush()
    return f"after garbage {note}"


server.run()
