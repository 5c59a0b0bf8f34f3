"""Federated training on Flower: the recordings stay at their sites, only weights and
aggregates travel.

    iotfuse federate server --rounds 10 --min-sites 4 --out model/      # server.py
    iotfuse federate site --server HOST:9091 --data site.iotrec          # site.py (each site)
    iotfuse federate simulate --sites 4 --data REC... --out DIR          # simulate.py

Round 1 gathers the normalisation statistics (stats.py): each site sends per-metric counts,
sums and sums of squares of its training windows' telemetry and its label counts; the
server turns them into the model's mean/std and classes, builds the model and sends it.
Rounds 2..N+1 are federated averaging: each site trains the `iotfuse train` recipe on its
windows for `local_epochs` and sends its weights; the server averages them weighted by
training windows; every site scores the average on its held-out validation windows and
sends the confusion counts, whose sum chooses the best round (protocol.py says what each
message holds). The result is a model directory like `iotfuse train`'s.

Flower is imported with its usage telemetry off (FLWR_TELEMETRY_ENABLED=0): neither the
server nor a site contacts anything but each other.
"""

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # before any flwr import: no phoning home
