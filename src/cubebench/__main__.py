from cubebench.cli import main

raise SystemExit(main())
