"""The closed loop as a job (``hotdog loop``): retrain when labelled feedback or drift call for it,
shadow the candidate, gate it, promote or reject; with no trigger it exits 0 and changes nothing.

Laptop:   python jobs/loop.py --config configs/sample.yaml --set prediction_log.location=answers
Cluster:  ray job submit --working-dir . -- python jobs/loop.py --config configs/hotdog.yaml \
              --set prediction_log.location=s3://bucket/prediction-log --set loop.min_live_requests=500
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["loop", *sys.argv[1:]]))
