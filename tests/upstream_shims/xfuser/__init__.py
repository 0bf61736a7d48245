"""TEST-ONLY shim of xfuser (see ../README.md): one process, no sequence parallelism."""
