# Dev/run image for taskpool. `make run` (the default command) runs the demo.
# tools/container-check builds it and starts the dev container (`make container-test`).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The Makefile drives the install and the run; python:3.11-slim has no make.
RUN if ! command -v make >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends make \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /workspace
COPY . /workspace

# The same install as on a host, with the venv kept outside the (mountable) workspace.
RUN make install VENV=/opt/venv

ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

CMD ["make", "run"]
