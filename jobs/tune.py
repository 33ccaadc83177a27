"""The sweep job: Ray Tune over filters, dropout and learning rate, ASHA, then promotion.

Laptop:   python jobs/tune.py --config configs/sample.yaml --set tune.num_samples=4
Cluster:  ray job submit --working-dir . -- python jobs/tune.py --config configs/hotdog.yaml \
              --set data.root=s3://bucket/hotdog --set train.use_gpu=true --set train.storage_path=s3://bucket/runs
Resume:   python jobs/tune.py --config ... --name SWEEP --resume

Same options as ``hotdog tune``.
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
