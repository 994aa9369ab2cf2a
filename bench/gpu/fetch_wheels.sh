#!/usr/bin/env bash
# The wheels the GPU benchmark carries to the lent GPU machine (Python 3.12, no network there):
#   .whl/lf   the trainer: LLaMA-Factory 0.9.5 and the versions it accepts (the machine's own
#             transformers 5.17 / peft 0.21 / accelerate 1.15 are too new), plus Liger's kernels;
#   .whl/app  what the app and its Celery worker need that the machine's image lacks.
# Run in the repo root on a machine with PyPI access; .whl/ must be git-ignored (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/../.."
get() {
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@"
}
get .whl/lf llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 accelerate==1.11.0 datasets==4.0.0 \
  trl==0.24.0 omegaconf==2.3.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 tokenizers==0.22.2 \
  liger-kernel==0.8.5
# antlr4-python3-runtime 4.9.3 (omegaconf's) has no wheel on PyPI: build one.
python3 -m pip wheel -q --no-deps --no-binary=:all: -w .whl/lf antlr4-python3-runtime==4.9.3
get .whl/app fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  sqlmodel==0.0.50 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 uvicorn==0.54.0 celery==5.7.0 kombu==5.7.0 \
  billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click==8.5.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 \
  click-repl==0.4.1 prompt_toolkit==3.0.53 wcwidth==0.9.4 python-multipart==0.0.34 sse-starlette==3.7.0 \
  argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1 pycparser==3.12 itsdangerous==2.2.0 \
  redis==8.1.0 typer==0.29.2 tzlocal==5.4.5 opentelemetry-api==1.45.2 typing_extensions==4.16.0 \
  anyio==4.16.0 annotated-doc==0.0.7
du -sh .whl/lf .whl/app
