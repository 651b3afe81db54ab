from lmkiln.cli import main

raise SystemExit(main())
