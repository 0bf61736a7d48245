"""Adapters for voice-agent frameworks: a Pipecat service and processor (``pipecat.py``) and
a LiveKit Agents audio output (``livekit.py``).

Each module imports its framework, so import the one you use; the rest of avatar-stream
never imports them (install the extras: ``pip install 'avatar-stream[pipecat]'`` or
``'avatar-stream[livekit]'``). What both share, with no framework in it: ``segments.py``
(speech segments into a session, and what became of each) and ``turns.py`` (the avatar's
turn state from the framework's turn signals).
"""
