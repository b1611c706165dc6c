from medqc.cli import main

raise SystemExit(main())
