from eztunnel_lab.cli import main

raise SystemExit(main())
