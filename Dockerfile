# istd in a container: one image for every node of docker-compose.yml.
#
# Portable: builds FROM python:3.11-slim wherever a registry can be reached. On a machine that reaches no
# container registry, scripts/docker-demo.sh builds a stand-in from Debian packages and passes it with
# --build-arg BASE_IMAGE=... (no pull).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Dependencies first, read from pyproject.toml, so that a change to istd's code does not fetch them again.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"] + ["wheel"] + p["project"]["dependencies"]))' > /tmp/requirements.txt \
 && python3 -m pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
# Then istd itself (no dev extras); its build requirements are already installed.
COPY README.md ./
COPY istd istd
COPY protocol protocol
COPY gcache gcache
RUN python3 -m pip install --no-build-isolation --no-deps . \
 && istd --version \
 && cd / && rm -rf /src

COPY scripts/docker-entrypoint.sh /usr/local/bin/istd-entrypoint
# istd runs as an unprivileged user; a named volume mounted on /var/lib/istd starts owned by it.
RUN chmod 0755 /usr/local/bin/istd-entrypoint \
 && useradd --system --home-dir /var/lib/istd --shell /usr/sbin/nologin istd \
 && mkdir -p /var/lib/istd \
 && chown istd:istd /var/lib/istd
USER istd
WORKDIR /var/lib/istd
LABEL org.opencontainers.image.title="istd" \
      org.opencontainers.image.description="Galera-compatible IST: istd node, donor, joiner"

# 4567 group communication (replication), 4568 IST, 4444 SST (reserved), 4580 HTTP API
EXPOSE 4567 4568 4444 4580
CMD ["istd", "--help"]
