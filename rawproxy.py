from rawproxy.cli import main
raise SystemExit(main())
