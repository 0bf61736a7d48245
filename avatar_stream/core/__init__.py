"""The session core, with no transport in it: a session's speech queue and speech input,
the engine worker's threads, the media clock and the synchronizer that owns A/V timing.
A transport (``transports/``) hands it speech and takes its paced media through a
:class:`~avatar_stream.core.sink.MediaSink`."""
