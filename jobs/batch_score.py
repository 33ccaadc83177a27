"""The nightly scoring job: a night's images through the promoted model into a Parquet partition.

Laptop:   python jobs/batch_score.py --config configs/sample.yaml --input data/sample/test --output predictions
Cluster:  ray job submit --working-dir . -- python jobs/batch_score.py --config configs/hotdog.yaml \
              --input 's3://bucket/incoming/{date}/' --output s3://bucket/predictions/ [--date 2026-11-22]

Same options as ``hotdog score``. Rerunning a date replaces its partition.
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
