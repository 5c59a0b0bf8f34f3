#!/usr/bin/env bash
# Produce the shipped default model, fusion/default_model/, with fixed seeds.
#
#   scripts/train_default_model.sh             # simulate the training data, train the model
#   scripts/train_default_model.sh --evaluate  # ...then the held-out evaluation: baselines
#                                              # trained by the same recipe, reports
#
# Everything but the model goes to $WORK (default build/default-model, git-ignored; about
# 6 GB of recordings). Training runs on the CPU with $THREADS threads (default 2), seeded:
# the same torch version, thread count and CPU model give the same weights (and so the same
# sha256 version); another CPU model rounds differently and gives other weights of the same
# quality (the shipped sha256:2e460b77... came from an x86-64 2-core VM). On 2 idle cores:
# ~5 min to simulate, ~2 min for the windows, ~12 min to train (22 s an epoch); --evaluate
# adds ~30 min. Keep the machine otherwise idle: two OpenMP threads that share their cores
# with another CPU-bound process spin at every barrier (seen: 262 s for one epoch).
set -euo pipefail

cd "$(dirname "$0")/.."
IOTFUSE=${IOTFUSE:-.venv/bin/iotfuse}
WORK=${WORK:-build/default-model}
export OMP_NUM_THREADS=${THREADS:-2}
mkdir -p "$WORK"

# training data: 2 x 120 devices (each a different camera scene, microphone, sensor unit and
# hardware setup) x 60 s; seeds 1 and 2. Held-out data below uses other seeds only. The
# second 120 devices (2026-12-03) raised every held-out figure: fused 0.938 / 0.922 ->
# 0.963 / 0.944, without audio 0.763 / 0.757 -> 0.780 / 0.775 (README, Model quality).
"$IOTFUSE" simulate --seed 1 --devices 120 --duration 60 --profile train \
    --out "$WORK/train.iotrec" --overwrite
"$IOTFUSE" simulate --seed 2 --devices 120 --duration 60 --profile train \
    --out "$WORK/train2.iotrec" --overwrite

TRAIN=(--data "$WORK/train.iotrec" "$WORK/train2.iotrec" --epochs 30 --seed 0 --device cpu
       --overwrite)
"$IOTFUSE" train "${TRAIN[@]}" --name default --out fusion/default_model

[[ "${1:-}" == "--evaluate" ]] || exit 0

# held-out recordings: new seeds, 32 devices x 60 s, the training profile and the unseen
# profile (hardware setups training never saw: frame sizes and rates, audio rates,
# chunk lengths, telemetry rates)
"$IOTFUSE" simulate --seed 1001 --devices 32 --duration 60 --profile train \
    --out "$WORK/test-train.iotrec" --overwrite
"$IOTFUSE" simulate --seed 1002 --devices 32 --duration 60 --profile unseen \
    --out "$WORK/test-unseen.iotrec" --overwrite

# single-modality baselines, same data and recipe
for m in camera audio telemetry; do
    "$IOTFUSE" train "${TRAIN[@]}" --modalities "$m" --name "only-$m" --out "$WORK/only-$m"
done

BASELINES=("$WORK/only-camera" "$WORK/only-audio" "$WORK/only-telemetry")
"$IOTFUSE" evaluate --device cpu --data "$WORK/test-train.iotrec" \
    --out "$WORK/report-train" --compare "${BASELINES[@]}"
"$IOTFUSE" evaluate --device cpu --data "$WORK/test-unseen.iotrec" \
    --out "$WORK/report-unseen" --compare "${BASELINES[@]}"
