# EFT Serve: the image every Ray pod of the Helm chart runs (its default image), with the
# project installed as `make install` installs it, plus the tp and plot extras.
#
#   docker build -t eft-serve:0.1.0 .                               # CPU
#   docker build -t eft-serve:0.1.0-cu128 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # NVIDIA GPUs
#
# PyTorch's CUDA wheels carry the CUDA runtime, so the slim Python base serves GPUs (the
# node's NVIDIA container runtime brings the driver); BASE_IMAGE swaps in another base with
# Python 3.11 as python3, e.g. one with CUDA's own libraries. No model is baked in: the chart
# mounts them (values modelVolume).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# make runs the install steps; nothing is compiled (no C++ op is built at install or start).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make install VENV=/opt/eft PYTHON=python3 EXTRAS=tp,plot EDITABLE= TORCH_INDEX=${TORCH_INDEX}

FROM ${BASE_IMAGE}
# wget: KubeRay before 1.6 probes Ray's health with `bash -c "wget ... | grep success"`.
# uid 1000, as Ray's own images run, so volumes written by either stay readable.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash ray
COPY --from=build /opt/eft /opt/eft
ENV PATH=/opt/eft/bin:${PATH} \
    PYTHONUNBUFFERED=1
USER 1000
WORKDIR /home/ray
# KubeRay replaces the command with `ray start`; run alone, the image explains itself.
CMD ["eft", "--help"]
