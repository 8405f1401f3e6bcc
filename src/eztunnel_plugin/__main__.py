from eztunnel_plugin.cli import main

raise SystemExit(main())
