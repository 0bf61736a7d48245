"""The frameworks stay optional: nothing outside ``avatar_stream.integrations`` imports
them, so the server, the clients and the CLI run without Pipecat or LiveKit installed."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("pipecat", "livekit")


def test_the_server_clients_and_cli_import_no_framework() -> None:
    code = (
        "import sys\n"
        "import avatar_stream, avatar_stream.transports.http.app, avatar_stream.tools.cli\n"
        "import avatar_stream.client, avatar_stream.bench.runner\n"
        "import avatar_stream.integrations, avatar_stream.integrations.segments\n"
        "import avatar_stream.integrations.turns\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
