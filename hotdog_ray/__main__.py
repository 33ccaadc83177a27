from hotdog_ray.cli import main

raise SystemExit(main())
