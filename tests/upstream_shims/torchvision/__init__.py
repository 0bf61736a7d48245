"""TEST-ONLY shim of torchvision (see ../README.md): only what upstream FlashHead calls."""
