from hydra_watchdog.cli import main

raise SystemExit(main())
