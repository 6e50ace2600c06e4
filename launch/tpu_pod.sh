#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice: the same command runs on every worker;
# jax.distributed.initialize() finds the other workers from the TPU metadata.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project \
#   EXPERIMENT=transfusion_0.16B WORKDIR=gs://my-bucket/runs/tf016 \
#   REPO_URL=https://github.com/ORG/tfusion.git \
#     bash launch/tpu_pod.sh [--config.train.steps=1000 ...]
#
# Extra arguments are passed to launch.train (config overrides). WORKDIR should be
# a GCS path (or a filesystem all workers share) so every host writes the same
# checkpoints. Re-running the script resumes from the newest checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
: "${EXPERIMENT:?set EXPERIMENT (a name in experiments/registry.py)}"
: "${WORKDIR:?set WORKDIR (shared by all workers, e.g. gs://...)}"
REPO_URL="${REPO_URL:-}"          # cloned on the workers when set
REPO_DIR="${REPO_DIR:-~/tfusion}"  # where the code lives on the workers
BRANCH="${BRANCH:-main}"
EXTRA_ARGS="$*"

gcloud_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}

if [[ -n "$REPO_URL" ]]; then
  gcloud_ssh "set -e; if [ ! -d $REPO_DIR ]; then git clone $REPO_URL $REPO_DIR; fi; \
    cd $REPO_DIR && git fetch -q && git checkout -q $BRANCH && git pull -q; \
    pip install -q -e '.[tpu]'"
fi

# nohup + log per worker: an ssh disconnect does not kill the run.
gcloud_ssh "cd $REPO_DIR && nohup python -m launch.train \
  --config=experiments/registry.py:$EXPERIMENT --workdir=$WORKDIR $EXTRA_ARGS \
  > ~/tfusion_train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; logs: ~/tfusion_train.log on each worker"
