"""A session's turn state: what the avatar does in the conversation when it is not talking.

A client sets ``idle``, ``listening`` or ``thinking`` (the ``state`` control message, or
``POST .../state``); the microphone, when it carries the user's voice (``"microphone":
"listen"`` in the offer), makes the avatar listen while the user speaks. What the face
shows follows one order, the first that holds:

1. ``speaking`` while the avatar's speech plays (from its ``speech.started`` to the
   ``speech.finished`` of the last utterance, a barge-in included);
2. ``listening`` while the microphone hears the user (listen mode only);
3. the state the client set last.

The state set outlives speech: after a reply the avatar shows again what was set, except
``thinking``, which the start of speech ends (the answer has come): it falls back to
``idle``. A state set while the avatar speaks waits under the speech and shows when it ends.
Every change of what is shown is one event, ``{"type": "state.changed", "state", "previous"}``
(``speaking`` included); the engine is told the state under the speech (it sees the speech
itself, frame by frame, and lets it win).
"""

from __future__ import annotations

from collections.abc import Callable

STATES = ("idle", "listening", "thinking")  # what a client may set
SPEAKING = "speaking"

#: (state, user speech energy 0..1 or None) to the engine stream
ShowFn = Callable[[str, float | None], None]


def check_state(value: object) -> str:
    """``value`` if it is a state a client may set; ValueError with the choices otherwise."""
    if not isinstance(value, str) or value not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}; got {value!r}")
    return value


class TurnState:
    """The layers above, and one ``on_change(state, previous)`` per change of what shows."""

    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self.on_change = on_change
        self.requested = "idle"  #: the state the client set last (thinking ends with speech)
        self.speaking = False
        self.user_speaking = False
        self.user_energy = 0.0
        self._shown = "idle"
        self._show: ShowFn | None = None

    @property
    def shown(self) -> str:
        return self._shown

    @property
    def below_speech(self) -> str:
        """What shows when the avatar is not speaking."""
        return "listening" if self.user_speaking else self.requested

    def attach(self, show: ShowFn) -> None:
        """Tell ``show`` (the engine stream's ``set_state``) every change from now on."""
        self._show = show
        self._tell_engine()

    def set(self, state: str) -> None:
        self.requested = check_state(state)
        self._update()

    def set_speaking(self, speaking: bool) -> None:
        if speaking and not self.speaking and self.requested == "thinking":
            self.requested = "idle"  # the answer has come
        self.speaking = speaking
        self._update()

    def hear(self, speaking: bool, energy: float) -> None:
        """The microphone (listen mode), every packet: is the user speaking, how loud."""
        changed = speaking != self.user_speaking
        self.user_speaking, self.user_energy = speaking, energy
        if changed:
            self._update()
        elif speaking:
            self._tell_engine()  # the nods follow the voice

    def _update(self) -> None:
        shown = SPEAKING if self.speaking else self.below_speech
        self._tell_engine()
        if shown != self._shown:
            previous, self._shown = self._shown, shown
            self.on_change(shown, previous)

    def _tell_engine(self) -> None:
        if self._show is not None:
            state = self.below_speech
            self._show(state, self.user_energy if self.user_speaking else None)
