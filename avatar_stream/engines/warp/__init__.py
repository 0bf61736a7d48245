"""The embedded CPU engine (``warp``): animate one photo with displacement-field blendshapes.

Why this design: it needs no model weights and no GPU, so the whole product runs (and is
tested) anywhere, at a few milliseconds per frame.

``prepare`` turns the face rig (468 MediaPipe landmarks) into dense displacement fields, one
per control (jaw, lip spread / round, brow, head yaw / pitch / roll, breathing). Each field
has compact support with a smooth falloff, so hair and background stay still and nothing
tears. Per frame the stream turns 40 ms of speech into control values, sums the weighted
fields into one backward map and draws the frame with a single ``cv2.remap`` over the region
the fields touch. Two things a warp cannot do are painted on afterwards: the inside of an open
mouth (a warp can only stretch the lips, never reveal what is behind them) and closed eyelids
(warping lid skin down would drag glasses rims and brows along).

Conventions: a field ``D`` is a *backward* displacement in output pixel coordinates: output
pixel ``q`` is sampled from the photo at ``q - sum(w_i * D_i(q))``. Building fields in output
coordinates lets the jaw use a hard split along the lip line (the lips part, the gap is painted
over) without folding the picture anywhere else.

Modules: ``rig`` (geometry and fields, built once per photo), ``paint`` (one frame: the
remap, then the mouth's inside and the eyelids), ``motion`` (speech and idle life to
controls: the per-session stream), ``cache`` (rigs kept on disk), ``engine``.
"""

from avatar_stream.engines.warp.engine import WarpEngine

__all__ = ["WarpEngine"]
