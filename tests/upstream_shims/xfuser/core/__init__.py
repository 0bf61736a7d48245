"""TEST-ONLY shim (see ../../README.md)."""
