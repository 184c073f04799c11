# shardq: one image, three roles; the command picks the role (DESIGN §1, §8):
#   podman run localhost/shardq:dev                                   # shardq node (default)
#   podman run localhost/shardq:dev gateway --seed NODE:6789[,…]
#   podman run localhost/shardq:dev operator [--namespace N]
# Flags are also environment variables (SHARDQ_PORT, SHARDQ_TOKEN, …).
#
# Built offline by scripts/k8s/build_image.sh, which first puts the wheels of the five
# distributions (shardq, shardq-server, shardq-node, shardq-gateway, shardq-operator) and of
# every dependency in build/wheels/ (the only files .dockerignore lets into the context), then
# runs `podman build --pull=never --network=none --format docker`. The servers register their
# sub-commands with `shardq` (entry-point group shardq.commands); the build checks they all load.

# --- stage 1: a virtualenv with shardq's dependencies, from wheels only ----------------------
FROM python:3.11-slim AS deps
# kubernetes/aio (the client's asyncio twin, 68 MB of the image's 180) is never imported: the
# operator uses the synchronous client in threads, and kopf its own aiohttp client.
COPY build/wheels/deps/ /wheels/deps/
RUN python3 -m venv --without-pip /opt/shardq \
 && python3 -m pip --python /opt/shardq/bin/python install --no-index --no-cache-dir \
        --no-deps /wheels/deps/*.whl \
 && rm -rf /opt/shardq/lib/python3.11/site-packages/kubernetes/aio

# --- stage 2: the runtime: the base image, the virtualenv, an unprivileged user ---------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="shardq" \
      org.opencontainers.image.description="shardq job queue: node, gateway and Kubernetes operator" \
      org.opencontainers.image.licenses="MIT"
# Inside a container a server must listen on every interface, and a node keeps its WAL on the
# volume; both stay overridable (flags win over SHARDQ_* variables).
ENV PATH=/opt/shardq/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHARDQ_HOST=0.0.0.0 \
    SHARDQ_DATA_DIR=/data
RUN groupadd --system --gid 10001 shardq \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin shardq \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0750 /data
# The dependencies (~115 MB) are one layer that stays cached while only shardq's code changes;
# shardq itself (a small wheel) goes on top, installed by the base image's pip (/usr/bin/python3:
# `python3` on PATH is the venv's, which has no pip).
COPY --from=deps /opt/shardq /opt/shardq
COPY build/wheels/shardq/ /tmp/shardq-wheel/
# The hot path compiled with mypyc (build/wheels/native: compiled on the build host, since this
# build is offline and has no C compiler; empty without one) goes beside the sources, and
# `native.stamp()` checks they are the sources compiled (else the image runs
# them interpreted, and the node says so at start).
COPY build/wheels/native/ /tmp/shardq-native/
RUN /usr/bin/python3 -m pip --python /opt/shardq/bin/python install --no-index --no-cache-dir \
        --no-deps /tmp/shardq-wheel/*.whl \
 && /usr/bin/python3 -m pip --python /opt/shardq/bin/python check \
 && /opt/shardq/bin/python -c "from shardq.cli.subcommands import discover; \
        missing = discover()[1]; assert not missing, missing" \
 && rm -rf /tmp/shardq-wheel /tmp/shardq-native/.keep \
 && cp -a /tmp/shardq-native/. /opt/shardq/lib/python3.11/site-packages/ \
 && rm -rf /tmp/shardq-native \
 && if [ -f /opt/shardq/lib/python3.11/site-packages/shardq/_hotpath.json ]; then \
        /opt/shardq/bin/python -c 'from shardq import native; print(native.stamp())'; fi \
 && if ! /opt/shardq/bin/python -c 'import shardq_node.runtime, shardq_gateway.main'; then \
        echo "the compiled modules do not load here: the image runs interpreted"; \
        rm -f /opt/shardq/lib/python3.11/site-packages/shardq/_hotpath.json \
              /opt/shardq/lib/python3.11/site-packages/shardq*/*.so \
              /opt/shardq/lib/python3.11/site-packages/shardq*/*/*.so; fi \
 && /opt/shardq/bin/python -c 'from shardq import native; print(native.status().describe())'
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6789/tcp 6790/tcp
# For docker/podman; Kubernetes ignores it and uses the probes the operator sets (/ready,
# /health). Nodes and gateways serve /health without a token; the operator has no HTTP port,
# so a container running `shardq operator` reports unhealthy here.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('SHARDQ_HTTP_PORT') or '6790'), timeout=2)"]
ENTRYPOINT ["shardq"]
CMD ["node"]
