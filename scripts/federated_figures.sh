#!/usr/bin/env bash
# What federated training and differential privacy cost, on held-out recordings (issue 17).
#
#   scripts/federated_figures.sh            # the full figures (hours on 2 cores)
#   SCALE=small scripts/federated_figures.sh  # docs/federated.md's figures (~70 min, 2 busy cores)
#
# Trains, on the same simulated data, with the same recipe (iotfuse train's):
#   central        iotfuse train, one process
#   central-ddp    iotfuse train --nproc 2 (DDP, gloo): should match central within 0.01
#   fed-iid        iotfuse federate simulate, 4 sites, by-device (each site whole devices)
#   fed-noniid     4 sites, by-class-skew (each labelled span to a site drawn from a
#                  per-class Dirichlet(0.5) share: every site a skewed class mix)
#   fed-noniid-group   fed-noniid with GroupNorm in the CNN trunks (--conv-norm group)
#   fed-dp-eps{1,3,8}  fed-noniid with DP-SGD at every site to that epsilon (delta 1e-5)
#   central-dp-eps{8,3,1}  iotfuse train --dp-epsilon E (CENTRAL_DP=0 leaves them out)
#   public         the same recipe on data of another seed (a public model, as the shipped
#                  one is to a user's sites)
#   public-tuned, public-dp-eps{8,3,1}  iotfuse train --init public on the training data,
#                  without DP and with DP-SGD to that epsilon (PUBLIC=0 leaves them out)
#   public-fed-dp-eps8  fed-noniid from public, DP-SGD at every site to epsilon 8
# and scores them side by side with `iotfuse evaluate --compare` on recordings simulated
# with seeds never used for training (report in $WORK/report/report.md and metrics.json).
# Everything goes to $WORK (default build/federated, git-ignored); recordings already there
# are reused (the simulator is deterministic).
set -euo pipefail

cd "$(dirname "$0")/.."
IOTFUSE=${IOTFUSE:-.venv/bin/iotfuse}
WORK=${WORK:-build/federated}
export OMP_NUM_THREADS=${THREADS:-2}
if [[ "${SCALE:-full}" == "small" ]]; then
    DEVICES=${DEVICES:-24} DURATION=${DURATION:-60} TEST_DEVICES=${TEST_DEVICES:-16}
    EPOCHS=${EPOCHS:-8} ROUNDS=${ROUNDS:-4} LOCAL_EPOCHS=${LOCAL_EPOCHS:-2}
    CENTRAL_DP=${CENTRAL_DP:-0}
else  # the default model's data and epochs
    DEVICES=${DEVICES:-120} DURATION=${DURATION:-60} TEST_DEVICES=${TEST_DEVICES:-32}
    # 60 rounds: FedAvg learns `intrusion` (camera only) as late as central training does
    # (its epochs 18-26), and 4 averaged sites move slower than one pass over all the data:
    # non-IID 0.835 at 15 rounds, 0.879 at 40, 0.905 at 60 against central's 0.915
    # (docs/federated.md). DP federations keep 15: their noise is calibrated to all rounds.
    EPOCHS=${EPOCHS:-30} ROUNDS=${ROUNDS:-60} LOCAL_EPOCHS=${LOCAL_EPOCHS:-2}
    DP_ROUNDS=${DP_ROUNDS:-15}
fi
DP_ROUNDS=${DP_ROUNDS:-$ROUNDS}
mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
timed() { local t=$SECONDS; "$@"; echo "$(( SECONDS - t ))" >"$WORK/seconds-$NAME"; }

log "data: $DEVICES devices x $DURATION s (seed 1); held out: $TEST_DEVICES devices (seed 1001)"
[[ -f "$WORK/train.iotrec" ]] || "$IOTFUSE" simulate --seed 1 --devices "$DEVICES" \
    --duration "$DURATION" --out "$WORK/train.iotrec"
[[ -f "$WORK/test.iotrec" ]] || "$IOTFUSE" simulate --seed 1001 --devices "$TEST_DEVICES" \
    --duration "$DURATION" --out "$WORK/test.iotrec"

# --no-absent-views: the sites train without absent views (fusion.train), so central does too
TRAIN=(--data "$WORK/train.iotrec" --epochs "$EPOCHS" --seed 0 --device cpu --overwrite
       --no-absent-views)
FED=(--data "$WORK/train.iotrec" --sites 4 --rounds "$ROUNDS" --local-epochs "$LOCAL_EPOCHS"
     --seed 0 --device cpu --overwrite)

NAME=central; log "$NAME"
timed "$IOTFUSE" train "${TRAIN[@]}" --name central --out "$WORK/central"
NAME=central-ddp; log "$NAME"
timed "$IOTFUSE" train "${TRAIN[@]}" --name central-ddp --nproc 2 --out "$WORK/central-ddp"
NAME=fed-iid; log "$NAME"
timed "$IOTFUSE" federate simulate "${FED[@]}" --split by-device --name fed-iid --out "$WORK/fed-iid"
NAME=fed-noniid; log "$NAME"
timed "$IOTFUSE" federate simulate "${FED[@]}" --split by-class-skew --name fed-noniid \
    --out "$WORK/fed-noniid"
NAME=fed-noniid-group; log "$NAME"  # GroupNorm: no batch statistics to average
timed "$IOTFUSE" federate simulate "${FED[@]}" --split by-class-skew --conv-norm group \
    --name fed-noniid-group --out "$WORK/fed-noniid-group"
for eps in 8 3 1; do
    NAME=fed-dp-eps$eps; log "$NAME"
    timed "$IOTFUSE" federate simulate "${FED[@]}" --split by-class-skew --name "$NAME" \
        --rounds "$DP_ROUNDS" --dp-epsilon "$eps" --out "$WORK/$NAME"
done
COMPARE=("$WORK/central-ddp" "$WORK/fed-iid/model" "$WORK/fed-noniid/model"
         "$WORK/fed-noniid-group/model" "$WORK/fed-dp-eps8/model" "$WORK/fed-dp-eps3/model"
         "$WORK/fed-dp-eps1/model")
if [[ "${CENTRAL_DP:-1}" != 0 ]]; then
    for eps in 8 3 1; do
        NAME=central-dp-eps$eps; log "$NAME"
        timed "$IOTFUSE" train "${TRAIN[@]}" --name "$NAME" --dp-epsilon "$eps" --out "$WORK/$NAME"
        COMPARE+=("$WORK/$NAME")
    done
fi

# from a public model (PUBLIC=0 leaves these out): the same recipe on data simulated with
# another seed (none of the training data's devices), then fine-tuned on the training data
# with `train --init`, without DP and with DP-SGD to epsilon 8, 3, 1 ($TUNE_EPOCHS epochs)
if [[ "${PUBLIC:-1}" != 0 ]]; then
    [[ -f "$WORK/public.iotrec" ]] || "$IOTFUSE" simulate --seed 2 --devices "$DEVICES" \
        --duration "$DURATION" --out "$WORK/public.iotrec"
    NAME=public; log "$NAME"
    timed "$IOTFUSE" train --data "$WORK/public.iotrec" --epochs "$EPOCHS" --seed 0 --device cpu \
        --overwrite --name public --out "$WORK/public"
    TUNE=(--data "$WORK/train.iotrec" --init "$WORK/public" --epochs "${TUNE_EPOCHS:-10}"
          --seed 0 --device cpu --overwrite)
    NAME=public-tuned; log "$NAME"
    timed "$IOTFUSE" train "${TUNE[@]}" --name "$NAME" --out "$WORK/$NAME"
    COMPARE+=("$WORK/public" "$WORK/$NAME")
    for eps in 8 3 1; do
        NAME=public-dp-eps$eps; log "$NAME"
        timed "$IOTFUSE" train "${TUNE[@]}" --name "$NAME" --dp-epsilon "$eps" --out "$WORK/$NAME"
        COMPARE+=("$WORK/$NAME")
    done
    NAME=public-fed-dp-eps8; log "$NAME"  # 5 rounds x 2 local epochs: 10, as the fine-tunes
    timed "$IOTFUSE" federate simulate "${FED[@]}" --split by-class-skew --init "$WORK/public" \
        --rounds 5 --dp-epsilon 8 --name "$NAME" --out "$WORK/$NAME"
    COMPARE+=("$WORK/$NAME/model")
fi

log "evaluate"
"$IOTFUSE" evaluate --device cpu --data "$WORK/test.iotrec" --model "$WORK/central" \
    --out "$WORK/report" --compare "${COMPARE[@]}"
for f in "$WORK"/seconds-*; do echo "$(basename "$f" | cut -d- -f2-): $(cat "$f") s"; done
