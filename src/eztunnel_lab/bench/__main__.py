from eztunnel_lab.bench.cli import main

raise SystemExit(main())
