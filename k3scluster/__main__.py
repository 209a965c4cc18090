from k3scluster.cli import main

raise SystemExit(main())
