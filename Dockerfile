# One image for the web app and the workers; the training and serving environments are built
# inside it by the same script `make` uses. GPU boxes build with TRAIN_EXTRA/SERVE_EXTRA
# pointing at the CUDA builds (see README, "Running on a GPU box").
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tuneboard
COPY . .
RUN python -m venv .venv && .venv/bin/pip install --no-cache-dir -e . \
    && bash envs/install.sh train && bash envs/install.sh serve
ENV PATH=/opt/tuneboard/.venv/bin:$PATH \
    TUNEBOARD_DATA_DIR=/data \
    TUNEBOARD_MODEL_ROOTS='["/models"]'
VOLUME ["/data"]
EXPOSE 8000
CMD ["tuneboard", "web", "--host", "0.0.0.0"]
