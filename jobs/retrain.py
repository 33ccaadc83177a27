"""The retraining job: when labelled feedback or drift call for it, fine-tune the champion into
the challenger (``hotdog retrain``); with no trigger it exits 0 saying why.

Laptop:   python jobs/retrain.py --config configs/sample.yaml --set prediction_log.location=answers
Cluster:  ray job submit --working-dir . -- python jobs/retrain.py --config configs/hotdog.yaml \
              --set prediction_log.location=s3://bucket/prediction-log [--force]
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
