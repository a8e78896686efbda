"""Schemathesis over the whole OpenAPI document, stateful links included: no 5xx, responses as documented."""

import subprocess
import sys
from pathlib import Path

from support.server import Server

ENV = {
    "IMAGEGENX_ENGINE__MAX_STEPS": "4",  # keeps generated work small: larger asks get a 400
    "IMAGEGENX_SERVICE__QUEUED_TASK_TTL_S": "10",
}


def test_openapi_document_holds_under_fuzzing(tmp_path):
    server = Server(tmp_path, env=ENV).start()
    try:
        key = server.key(rate=0, quota=5)  # unlimited rate; at most 5 tasks in flight
        schemathesis = Path(sys.executable).parent / "schemathesis"
        proc = subprocess.run(
            [
                str(schemathesis),
                "run",
                f"{server.url}/openapi.json",
                "-H",
                f"Authorization: Bearer {key}",
                "--checks",
                # no 5xx; status, body, media type and headers as documented; invalid data refused;
                # auth really enforced; a cancelled or missing task stays gone and created ones are found
                "not_a_server_error,response_schema_conformance,status_code_conformance,"
                "content_type_conformance,response_headers_conformance,negative_data_rejection,"
                "ignored_auth,use_after_free,ensure_resource_availability",
                "--max-examples",
                "40",
                "--phases",  # the coverage phase alone takes ~4-7 min on 2 cores; run it by hand
                "examples,fuzzing,stateful",
                "--workers",
                "2",
                "--request-timeout",
                "120",
                "--seed",
                "20261122",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert "Stateful" in proc.stdout
    finally:
        server.stop()
