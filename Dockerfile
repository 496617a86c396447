# The operator image (and, with the gateway extra, the gateway's): sandbox images are in images/sandbox/.
#
#   docker build -t ghcr.io/sandbox-operator/sandbox-operator:0.1.0 .
#
# Runs as an unprivileged user with a read-only root filesystem (the Helm chart sets it): the
# operator writes nothing to disk.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/*.whl)[operator,gateway]" && rm -rf /wheels
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["sandbox-operator"]
CMD ["run"]
