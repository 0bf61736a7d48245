# syntax=docker/dockerfile:1.7
# avatar-stream images. Two runtime targets:
#   cpu        (default, the last stage) the server with the embedded warp engine, no GPU
#   flashhead  a CUDA runtime image with SoulX-FlashHead at a pinned commit; the weights are
#              mounted at run time (/models), never baked in
#
#   docker build -t avatar-stream:cpu .
#   docker build --target flashhead -t avatar-stream:flashhead .
#   docker run --gpus all -p 8080:8080 -v /srv/models:/models:ro avatar-stream:flashhead

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# -- the wheel: built once, installed into both runtime images ----------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY avatar_stream ./avatar_stream
COPY setup.py ./
# the build takes MediaPipe's face models into the wheel (setup.py): nothing else to install
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- FlashHead on a GPU ---------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS flashhead
ARG DEBIAN_FRONTEND=noninteractive
# upstream's documented set-up: Python 3.10 (Ubuntu 22.04's), torch 2.7.1, its requirements.txt.
# Those conflict as written (upstream pins nvidia-nccl-cu12==2.27.3, torch 2.7.1 needs 2.26.2),
# so the image installs one locked set instead: docker/flashhead-requirements.lock, resolved
# for Python 3.10 / x86_64 from docker/flashhead-requirements.in (torch 2.7.1 from PyPI, the
# CUDA 12.6 build with its nvidia-* wheels; upstream's requirements; avatar-stream's own).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ffmpeg \
      build-essential libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
RUN python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10) and "the lock is for Python 3.10")' \
 && python3 -m venv /opt/venv && pip install --upgrade pip wheel
COPY docker/flashhead-requirements.lock /opt/flashhead-requirements.lock
# torch and torchvision named again: pip refuses a lock that holds other versions
RUN pip install --no-deps -r /opt/flashhead-requirements.lock torch==2.7.1 torchvision==0.22.1
# SoulX-FlashHead (Apache-2.0) at the commit this engine was written against (its
# requirements.txt is in the lock; a new commit may need the lock regenerated)
ARG FLASHHEAD_REPO=https://github.com/Soul-AILab/SoulX-FlashHead.git
ARG FLASHHEAD_COMMIT=12467cef31a9554cd9682a0521e6e87deaef9810
RUN git clone "${FLASHHEAD_REPO}" /opt/SoulX-FlashHead \
 && git -C /opt/SoulX-FlashHead checkout --detach "${FLASHHEAD_COMMIT}" \
 && git -C /opt/SoulX-FlashHead rev-parse HEAD > /opt/SoulX-FlashHead/COMMIT \
 && rm -rf /opt/SoulX-FlashHead/.git
# flash-attention builds for a long time; set INSTALL_FLASH_ATTN=1 (or bring a wheel) for it.
# Without it upstream falls back to PyTorch's scaled_dot_product_attention. Its dependencies
# (torch, einops) are in the lock, so it goes in with --no-deps too.
ARG INSTALL_FLASH_ATTN=0
RUN if [ "${INSTALL_FLASH_ATTN}" = "1" ]; then \
      pip install ninja && pip install --no-deps flash_attn==2.8.0.post2 --no-build-isolation; fi
COPY --from=wheel /wheels /wheels
# avatar-stream's dependencies (and its `flashhead` extra, torch) are in the lock
RUN whl="$(ls /wheels/avatar_stream-*.whl)" && pip install --no-deps "${whl}[flashhead]" \
 && rm -rf /wheels
ENV PYTHONPATH=/opt/SoulX-FlashHead \
    FLASHHEAD_SRC=/opt/SoulX-FlashHead \
    FLASHHEAD_CHECKPOINT_DIR=/models/SoulX-FlashHead-1_3B \
    FLASHHEAD_WAV2VEC_DIR=/models/wav2vec2-base-960h \
    AVATAR_STREAM_CACHE_DIR=/cache/avatar-stream \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models /cache && chown app:app /cache
USER 10001
VOLUME ["/models", "/cache"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["avatar-stream"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--engine", "flashhead", "--model", "lite"]

# -- CPU: the warp engine (default target) --------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PIP_NO_CACHE_DIR=1 AVATAR_STREAM_CACHE_DIR=/cache/avatar-stream
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/avatar_stream-*.whl && rm -rf /wheels
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /cache && chown app:app /cache
USER 10001
VOLUME ["/cache"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["avatar-stream"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
