"""More than one session, process or replica: admission (``capacity``), worker processes,
routing between replicas, and the Prometheus metrics."""
