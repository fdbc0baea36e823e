from mobynit.cli import main

raise SystemExit(main())
