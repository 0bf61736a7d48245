"""The latency benchmark: a real WebRTC client and the estimators it reports with."""
