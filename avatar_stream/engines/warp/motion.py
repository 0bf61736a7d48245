"""Speech to controls (loudness and formant bands to jaw and lip shape) and the idle life
of a face (blinks, drift, nods): the per-session stream, which redraws only what moved."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avatar_stream.engines.base import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    EngineStream,
)
from avatar_stream.engines.warp.paint import mouth_paint, render
from avatar_stream.engines.warp.rig import BLINK_DRAWN, REDRAW_PX, Controls, WarpRig

# --- audio to controls -------------------------------------------------------------------------

_WINDOW = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)
_FREQS = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)


def _band(lo: float, hi: float) -> np.ndarray:
    return (_FREQS >= lo) & (_FREQS < hi)


_LOW, _MID, _HIGH = _band(80, 400), _band(400, 2500), _band(3000, 8000)
_F1_BAND, _F2_BAND = _band(250, 1000), _band(800, 3000)
_GATE_DB = -55.0  # quieter than this is silence, whatever the recent level
_RANGE_DB = 26.0  # loudness span below the recent peak that maps to jaw 0..1
_BLINK = (0.5, 1.0, 0.75, 0.35, 0.1)  # per frame: ~200 ms, closing faster than opening
_DOUBLE_BLINK = 0.2  # chance that a blink comes with a second one right after it
_NOD_HZ, _NOD_DAMPING = 1.1, 0.55  # a nod: a damped swing of the head, pitch only
# turn states (no eye rig: the gaze is the head's). Listening: brows up, the head a little
# forward and steadier, small nods on the user's stresses. Thinking: the head turns aside
# and up with a slight tilt (degrees), brows a little up. Eased in and out by a spring.
_LISTEN_BROW, _LISTEN_LEAN, _LISTEN_STEADY = 0.5, 1.0, 0.8
_THINK_YAW, _THINK_PITCH, _THINK_ROLL, _THINK_BROW = 5.0, -3.0, 2.5, 0.2
_EASE_HZ = 1.3  # the turn spring: about 0.6 s from one state to the next, no jump


@dataclass(frozen=True)
class _Sound:
    """What the mouth needs to know about 40 ms of speech (all 0 for silence)."""

    level: float = 0.0  # loudness 0..1 relative to the recent peak
    open: float = 0.0  # vowel height from F1: 0 close (ee, oo) .. 1 open (ah)
    spread: float = 0.0  # front vowels and sibilants (F2 high: ee, eh, s)
    round: float = 0.0  # back rounded vowels (F2 and F1 low: oo, oh)
    closure: float = 0.0  # a murmur behind closed lips (m, b, the voice bar of a stop)
    hiss: float = 0.0  # frication: the teeth nearly together (s, sh, f)


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """np.clip for one number, without numpy's per-call cost (a dozen per frame)."""
    return lo if x < lo else hi if x > hi else float(x)


def _centroid(power: np.ndarray, band: np.ndarray) -> float:
    p = power[band]
    return float(np.dot(p, _FREQS[band]) / max(float(p.sum()), 1e-20))


class _Drift:
    """Slow, smooth, seeded head motion: a few incommensurate sines per axis."""

    def __init__(self, rng: np.random.Generator, amplitude: float) -> None:
        self.freq = rng.uniform(0.03, 0.2, 3)
        self.phase = rng.uniform(0.0, 2 * math.pi, 3)
        self.amp = amplitude * rng.uniform(0.5, 1.0, 3) / 1.8
        self._terms = list(
            zip(self.amp.tolist(), self.freq.tolist(), self.phase.tolist(), strict=True)
        )

    def __call__(self, t: float) -> float:
        return sum(  # per frame: plain floats beat three-element arrays
            a * math.sin(2 * math.pi * f * t + p) for a, f, p in self._terms
        )


class _Nod:
    """A damped spring on head pitch: a kick makes one natural nod (down, back, settle)."""

    def __init__(self) -> None:
        self.angle = self.speed = 0.0
        self._w = 2 * math.pi * _NOD_HZ

    def kick(self, degrees: float) -> None:
        """Start a nod peaking at about ``degrees`` (positive: down)."""
        self.speed += degrees * self._w * 1.6

    def step(self, dt: float) -> float:
        accel = -self._w * self._w * self.angle - 2 * _NOD_DAMPING * self._w * self.speed
        self.speed += accel * dt  # semi-implicit Euler: stable at 25 fps for this spring
        self.angle += self.speed * dt
        return self.angle


class _Ease:
    """A critically damped spring towards a target: starts and ends at rest, so a change of
    state never jumps (per frame it moves at most ~0.12 of the way, at 25 fps)."""

    def __init__(self) -> None:
        self.value = self.speed = 0.0
        self._w = 2 * math.pi * _EASE_HZ

    def step(self, target: float, dt: float) -> float:
        accel = self._w * self._w * (target - self.value) - 2 * self._w * self.speed
        self.speed += accel * dt
        self.value += self.speed * dt
        return self.value


class WarpStream(EngineStream):
    """One session: speech features -> smoothed controls -> frames. Everything random comes
    from one seeded generator, so the same seed and input give the same frames.

    Mouth shapes come from the sound itself, 40 ms at a time (no look-ahead, so streaming
    and offline rendering animate the same): loudness opens the jaw, the first formant
    scales it (open vowels wide, close ones narrow), the second sets spread against rounded
    lips, a low murmur with no formants above it (m, b) or silence closes the lips, and
    frication keeps the teeth together. Attack is fast, release a little slower, closures
    fastest, as lips move in speech."""

    frames_per_step = 1

    def __init__(self, rig: WarpRig, seed: int | None = None) -> None:
        self._turn = "idle"  # set on the event loop (set_state), read by the next step
        self._heard: float | None = None  # loudest user voice since the last step
        self._rig = rig
        # the farthest each control's field moves a pixel, per unit of the control
        self._reach = {
            name: float(np.abs(f.data).max()) for name, f in (rig.sharp | rig.smooth).items()
        }
        self._drawn: tuple[Controls, np.ndarray] | None = None  # the last frame drawn
        self._rng = np.random.default_rng(seed)
        self._frame = 0
        self._yaw, self._pitch, self._roll = (_Drift(self._rng, a) for a in (2.0, 1.2, 0.8))
        self._nod = _Nod()
        self._next_nod = self._frame + int(self._rng.uniform(4.0, 10.0) * FPS)
        self._last_kick = -FPS
        self._breath_phase = float(self._rng.uniform(0.0, 2 * math.pi))
        self._next_blink = self._blink_gap()
        self._blink_at = -len(_BLINK)
        self.controls = Controls()  #: the last step's controls (its frame may be a repeat)
        self.sound = _Sound()  #: the analysis of the last frame's speech (for tests)
        self._reset_speech()
        self._calm_until = 0
        self._jaw = self._spread = self._round = self._brow = self._talk = 0.0
        self._listen, self._think = _Ease(), _Ease()  # each state's weight, 0..1
        # which way it looks when thinking: half the sessions each way, from a draw already
        # made (a new one would change every later draw, and so idle, for a given seed)
        self._aside = 1.0 if self._breath_phase < math.pi else -1.0
        self._voice = self._voice_slow = 0.0  # the user's voice, fast and slow
        self._next_backchannel = 0

    def _reset_speech(self) -> None:
        self._peak_db = -20.0  # recent loudness peak: makes the mapping level-independent
        self._slow_level = 0.0
        self._f2 = 1500.0  # this voice's typical F2 region centroid, Hz

    def _blink_gap(self) -> int:
        return self._frame + int(self._rng.uniform(2.0, 6.0) * FPS)

    def reset(self) -> None:
        """Barge-in: forget the speech context; the mouth closes at the gentle release rate
        (not the snap of a closure in speech: nothing was said to close it), so there is no
        jump."""
        self._reset_speech()
        self._calm_until = self._frame + FPS // 2

    def set_state(self, state: str, energy: float | None = None) -> None:
        self._turn = state
        if energy is not None:
            heard = self._heard
            self._heard = energy if heard is None else max(heard, energy)

    def step(self, speech: np.ndarray | None) -> np.ndarray:
        c = self.controls = self._advance(speech)
        if self._drawn is None or self._moved(self._drawn[0], c):
            self._drawn = (c, render(self._rig, c))
        return self._drawn[1].copy()[None]

    def _moved(self, drawn: Controls, c: Controls) -> bool:
        """Whether ``c`` would draw a picture visibly different from the one drawn with
        ``drawn``: a blink on either, or the controls' change times their fields' reach
        (an upper bound on how far any pixel moves) over ``REDRAW_PX``. Between blinks the
        idle head drifts by hundredths of a pixel a frame: drawn again every few frames,
        it looks the same and costs half the drawing (and the encoder a picture with
        nothing new)."""
        if drawn.blink > BLINK_DRAWN or c.blink > BLINK_DRAWN:
            return True
        if abs(mouth_paint(c) - mouth_paint(drawn)) > 0.05:  # its opacity, not a move
            return True
        shift = sum(abs(getattr(c, k) - getattr(drawn, k)) * r for k, r in self._reach.items())
        return shift > REDRAW_PX

    def _analyse(self, speech: np.ndarray | None) -> _Sound:
        if speech is None:
            return _Sound()
        x = np.asarray(speech, dtype=np.float32).reshape(-1)
        if x.size != SAMPLES_PER_FRAME:
            raise ValueError(f"expected {SAMPLES_PER_FRAME} samples, got {x.size}")
        rms = math.sqrt(float(np.dot(x, x)) / x.size)
        db = 20.0 * math.log10(rms + 1e-9)
        self._peak_db = max(db, self._peak_db - 0.06, -45.0)  # ~1.5 dB/s release
        if db < _GATE_DB:
            return _Sound()
        level = _clamp((db - (self._peak_db - _RANGE_DB)) / (_RANGE_DB - 3.0))
        power = np.abs(np.fft.rfft(x * _WINDOW)) ** 2
        low, mid, high = (float(power[b].sum()) + 1e-20 for b in (_LOW, _MID, _HIGH))
        low_mid_db = 10.0 * math.log10(low / mid)
        high_db = 10.0 * math.log10(high / (low + mid))
        # formants measured against this voice's own F2 average, so a higher (or lower)
        # voice uses the whole range of shapes too
        f2 = _centroid(power, _F2_BAND)
        if level > 0.3 and high_db < -5.0:  # voiced, not a hiss
            self._f2 += (f2 - self._f2) * 0.03
        scale = _clamp(1500.0 / self._f2, 0.75, 1.3)
        f1, f2 = _centroid(power, _F1_BAND) * scale, f2 * scale
        vowel_open = _clamp((f1 - 320.0) / 330.0)
        return _Sound(
            level=level,
            open=vowel_open,
            spread=_clamp((f2 - 1750.0) / 600.0),
            round=_clamp((2000.0 - f2) / 700.0) * _clamp((650.0 - f1) / 250.0),
            # lips shut on a voiced murmur: strong low band, nothing above it
            closure=_clamp((low_mid_db - 3.0) / 6.0) * _clamp((-high_db - 18.0) / 5),
            hiss=_clamp((high_db + 5.0) / 10.0),
        )

    def _advance(self, speech: np.ndarray | None) -> Controls:
        sound = self.sound = self._analyse(speech)
        # loudness leads (it is what a viewer checks the lips against); the vowel only
        # scales it, and closures and hisses close it
        shape = (0.65 + 0.35 * sound.open) * (1.0 - sound.closure) * (1.0 - 0.6 * sound.hiss)
        jaw_target = 0.8 * sound.level**1.6 * shape  # expand: vowels open, consonants close
        if jaw_target >= self._jaw:
            rate = 0.7
        elif jaw_target < 0.4 * self._jaw and self._frame >= self._calm_until:
            rate = 0.7  # a closure in speech (stop, m, pause): the lips meet fast
        else:
            rate = 0.5
        self._jaw += (jaw_target - self._jaw) * rate
        voiced = min(1.0, 2.0 * sound.level) * (1.0 - sound.closure)
        spread_t = max(sound.spread, 0.6 * sound.hiss) * voiced
        round_t = sound.round * voiced
        self._spread += (spread_t - self._spread) * 0.35
        self._round += (round_t - self._round) * 0.35
        # emphasis: a loudness onset well above the recent average lifts the brows and
        # nods the head
        onset = sound.level - self._slow_level
        self._slow_level += (sound.level - self._slow_level) * 0.08
        brow_t = _clamp((onset - 0.3) * 2.0, 0.0, 0.8)
        self._brow += (brow_t - self._brow) * (0.3 if brow_t > self._brow else 0.06)
        self._talk += (sound.level - self._talk) * 0.05
        if brow_t > 0.3 and self._frame - self._last_kick > 0.8 * FPS:
            self._nod.kick(0.8 + 1.2 * brow_t)
            self._last_kick = self._frame
        if self._frame >= self._next_nod:  # now and then a small nod of its own
            if self._talk < 0.2:
                amount = float(self._rng.uniform(0.4, 0.9))
                if max(self._listen.value, self._think.value) < 0.5:  # a state nods its own
                    self._nod.kick(amount)
                    self._last_kick = self._frame
            self._next_nod = self._frame + int(self._rng.uniform(4.0, 10.0) * FPS)
        listen, think, lean = self._turn_pose(speaking=speech is not None)
        nod = self._nod.step(1.0 / FPS)

        t = self._frame / FPS
        if self._frame >= self._next_blink:
            self._blink_at = self._frame
            if self._rng.uniform() < _DOUBLE_BLINK:
                self._next_blink = self._frame + int(self._rng.integers(8, 12))
            else:
                self._next_blink = self._blink_gap()
        k = self._frame - self._blink_at
        blink = _BLINK[k] if 0 <= k < len(_BLINK) else 0.0
        self._frame += 1
        breath = math.sin(2 * math.pi * 0.25 * t + self._breath_phase)
        steady = 1.0 - _LISTEN_STEADY * listen  # a listener's gaze holds still
        return Controls(
            jaw=self._jaw,
            spread=self._spread,
            round=self._round,
            blink=blink,
            brow=min(1.0, self._brow + _LISTEN_BROW * listen + _THINK_BROW * think),
            yaw=self._yaw(t) * (1.0 + 0.5 * self._talk) * steady
            + _THINK_YAW * self._aside * think,
            pitch=self._pitch(t) * steady + 0.8 * self._talk - 1.0 * self._brow + nod
            + 0.15 * breath + lean + _THINK_PITCH * think,
            roll=self._roll(t) * steady + _THINK_ROLL * self._aside * think,
            breath=0.6 * breath,
        )

    def _turn_pose(self, speaking: bool) -> tuple[float, float, float]:
        """(listening weight, thinking weight, forward lean in degrees) for this frame, and
        the listener's nods. Speech wins: both weights ease out while it plays."""
        state, heard = self._turn, self._heard
        self._heard = None
        dt = 1.0 / FPS
        listen = self._listen.step(float(state == "listening" and not speaking), dt)
        think = self._think.step(float(state == "thinking" and not speaking), dt)
        voice = heard if heard is not None and state == "listening" else 0.0
        self._voice += (voice - self._voice) * (0.5 if voice > self._voice else 0.15)
        onset = self._voice - self._voice_slow
        self._voice_slow += (self._voice - self._voice_slow) * 0.05
        if listen > 0.5 and not speaking and self._frame - self._last_kick > 0.5 * FPS:
            if heard is not None:
                if onset > 0.1:  # a stress in the user's voice: a small nod with it
                    self._nod.kick(listen * (0.8 + 1.2 * min(1.0, self._voice)))
                    self._last_kick = self._frame
            elif self._frame >= self._next_backchannel:  # no voice here: now and then
                self._nod.kick(listen * float(self._rng.uniform(0.4, 0.8)))
                self._last_kick = self._frame
                self._next_backchannel = self._frame + int(self._rng.uniform(1.5, 3.5) * FPS)
        lean = listen * (_LISTEN_LEAN + 1.5 * self._voice)  # the head dips with the voice
        return listen, think, lean
