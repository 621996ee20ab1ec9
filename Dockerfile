# The collector as a container image: `collector run` (the server and its forwarder) from
# the one-file build, as a non-root user, to run beside an app in its network namespace
# (deploy/compose.yaml, deploy/kubernetes/). From a checkout:
#
#   docker build -t collector .
#
# Checked without a container runtime by tests/test_container.py (what it parses here, and
# the run of ENTRYPOINT + CMD with this ENV, as this USER, as PID 1).

# -- build: scripts/build-binary, as on a host, on the Debian release of the runtime stage.
# Built in the image rather than copied from dist/: the executable needs a glibc at least as
# new as the one it was built against, so it is built on the same Debian (12, glibc 2.36) it
# runs on, from the checkout alone, whatever the host that runs `docker build`. Python 3.11
# (CI's), with the shared libpython PyInstaller needs (the official images have one).
FROM python:3.11-slim-bookworm AS build
# PyInstaller reads and writes executables with binutils (objdump, objcopy).
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads (.dockerignore lets nothing else into the context). Without
# .git, the build's file times are SOURCE_DATE_EPOCH=0: two builds of one tree are the same.
COPY pyproject.toml cli.py ./
COPY scripts/build-binary scripts/build-constraints.txt scripts/
COPY collector collector
COPY forwarder forwarder
RUN scripts/build-binary

# -- runtime: the executable and what it needs of the system, nothing else.
FROM debian:12-slim
# The executable brings its Python and libraries; the loader needs libc6 and zlib1g (in the
# base image). ca-certificates: the system's CA bundle for HTTPS upstreams, named by
# SSL_CERT_FILE below (without it the bundle frozen into the build, certifi's, is used;
# with it, the file must exist: the forwarder reads it at start, even for http://); a
# private CA is added the Debian way (update-ca-certificates) in an image built on this.
# sqlite3: the tool that reads back the rows of a corrupt queue or dead-letter file
# (collector/store/salvage.py; without it a corrupt file is only moved aside).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates sqlite3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid and gid, so that volumes, fsGroup and runAsUser can name them. The data
# directory is made here, before VOLUME (a change to it after VOLUME would be discarded):
# a new named volume starts as a copy of it, owned by the user, mode 0700.
RUN groupadd --system --gid 10001 collector \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin collector \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/collector
COPY --from=build /src/dist/collector /usr/local/bin/collector
# Events on loopback only, for the app in the same network namespace; the health listener
# (/healthz, /readyz, /metrics) on all addresses (COLLECTOR_HEALTH_HOST's default), for
# the kubelet's probes and Prometheus. No key here: the upstream key is a file mounted at
# run time, named by COLLECTOR_UPSTREAM_KEY_FILE.
ENV COLLECTOR_DATA_DIR=/var/lib/collector \
    COLLECTOR_HOST=127.0.0.1 \
    COLLECTOR_HEALTH_PORT=8788 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
VOLUME ["/var/lib/collector"]
EXPOSE 8788
# Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
# The one-file loader is PID 1 here: it handles SIGTERM (and passes it on), so the stop is
# the collector's clean one (/readyz 503, requests in progress finished, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/collector"]
CMD ["run"]
