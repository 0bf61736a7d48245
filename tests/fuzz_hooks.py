"""schemathesis hooks for the API fuzz in tests/transports/http/test_openapi.py (test support,
loaded by the ``st`` process through ``SCHEMATHESIS_HOOKS``): how to put the API's own media
types on the wire (SDP and its trickle fragments are text, speech bodies bytes), and a line
per request sent (operation, status) to ``$AVATAR_STREAM_FUZZ_LOG``, for the per-operation
figures."""

import os

import schemathesis

schemathesis.serializer.alias(["application/sdp", "application/trickle-ice-sdpfrag"],
                              "text/plain")
schemathesis.serializer.alias(["audio/wav", "audio/L16", "audio/pcm"],
                              "application/octet-stream")

LOG = os.environ.get("AVATAR_STREAM_FUZZ_LOG")


@schemathesis.hook
def after_call(context, case, response) -> None:  # noqa: ANN001 - schemathesis' signature
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{case.operation.label}\t{response.status_code}\n")
