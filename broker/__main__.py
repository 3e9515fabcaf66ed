from broker import cli

raise SystemExit(cli.main())
