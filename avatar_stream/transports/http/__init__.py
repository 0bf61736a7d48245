"""The HTTP API (aiohttp): the app and its start-up (``app``), one module per group of
routes, the shared error answers and body readers, and the process's state."""
