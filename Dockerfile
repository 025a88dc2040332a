# syntax=docker/dockerfile:1
#
# rotator's container image: `docker build -t rotator:0.1.0 .`
#
# - Two stages: `build` makes wheels of rotator and every dependency; the final stage installs them from
#   those wheels only (no index, no compiler, no source tree, no wheels left behind).
# - Runs as the unprivileged UID/GID 10001 (numeric, so Kubernetes' runAsNonRoot can verify it).
# - Works with a read-only root filesystem: rotator writes nothing but its host locks (under /tmp unless
#   service.lock_dir says otherwise), and HOME points at /tmp; mount a volume there (Kubernetes: an
#   emptyDir; docker: --read-only --tmpfs /tmp).
# - No config and no credentials inside: mount the config and pass it with --config FILE or
#   ROTATOR_CONFIG; AWS credentials come from the standard chain (IRSA, instance role, environment).
#
# The base image is pinned by version and by digest (the multi-platform index of that tag). To move to a
# newer patch release, take the digest from the registry, e.g.
#   docker buildx imagetools inspect python:3.11.X-slim-bookworm
# and update both stages' ARG below in one change.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the package build reads (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY rotator/ rotator/
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="rotator" \
      org.opencontainers.image.description="Rotate AWS IAM access keys without breaking their consumers" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config
# The wheels are mounted from the build stage for this one step, so they never become a layer.
# pip compiles the bytecode here, at build time, so nothing is written under site-packages at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels rotator \
    && groupadd --system --gid 10001 rotator \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin rotator
USER 10001:10001
WORKDIR /tmp
# The only place rotator (and Python) may write; everything else can be read-only.
VOLUME ["/tmp"]
# /healthz, /readyz and /metrics of `rotator run` (service.listen; set it to 0.0.0.0:9090 in a container).
EXPOSE 9090
ENTRYPOINT ["rotator"]
CMD ["run"]
