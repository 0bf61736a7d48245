"""How sessions reach the outside: ``webrtc/`` (the peer connection, its tracks, encoders
and ICE), ``http/`` (the HTTP and WebSocket API) and ``protocol`` (the speech protocol both
carry). A new transport is a sibling of ``webrtc/``: it feeds a core session speech and
gives it a media sink."""
