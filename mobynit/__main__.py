from mobynit.tools.cli import main

raise SystemExit(main())
