"""The main job: train, track, evaluate and register.

Laptop:   python jobs/train.py --config configs/sample.yaml
Cluster:  ray job submit --working-dir . -- python jobs/train.py --config configs/hotdog.yaml \
              --set data.root=s3://bucket/hotdog --set train.num_workers=4 --set train.use_gpu=true

Same options as ``hotdog train``.
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
