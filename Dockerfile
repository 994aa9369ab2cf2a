# One image for the web app and the workers, with the training and serving environments inside.
#   docker build -t tuneboard .                       # CPU (the locks of envs/*.txt)
#   docker build -t tuneboard --build-arg FLAVOUR=cuda .   # GPU workers: CUDA builds of llamafactory and vLLM
# (Not built in CI: no Docker engine runs there. The CPU flavour takes torch 2.13.0+cpu from
# PyTorch's CPU index, which the machines of this project find on their own disk instead.)
FROM python:3.11-slim
ARG FLAVOUR=cpu
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tuneboard
COPY . .
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv .venv && .venv/bin/pip install --no-cache-dir -e .
RUN if [ "$FLAVOUR" = cuda ]; then \
        python -m venv .envs/train && PIP_EXTRA_INDEX_URL= .envs/train/bin/pip install --no-cache-dir llamafactory==0.9.5 \
        && python -m venv .envs/serve && PIP_EXTRA_INDEX_URL= .envs/serve/bin/pip install --no-cache-dir vllm; \
    else \
        bash envs/install.sh train && bash envs/install.sh serve; \
    fi
ENV PATH=/opt/tuneboard/.venv/bin:$PATH \
    TUNEBOARD_DATA_DIR=/data \
    TUNEBOARD_MODEL_ROOTS='["/models"]'
VOLUME ["/data"]
EXPOSE 8000
CMD ["tuneboard", "web", "--host", "0.0.0.0"]
