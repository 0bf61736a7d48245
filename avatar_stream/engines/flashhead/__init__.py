"""The FlashHead engine: upstream's SoulX-FlashHead pipeline streamed per session on one
GPU (``engine``), its settings and checks that need no torch (``config``), how it calls
into upstream's code (``upstream``), and a test-only stand-in pipeline (``standin``)."""
