"""WebRTC with aiortc: the peer that carries a core session (``peer``), its outgoing
tracks and encoders, the receive jitter buffer, ICE and TURN settings, and the start-up
check of the aiortc internals all of these rely on."""
