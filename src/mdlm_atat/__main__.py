from mdlm_atat.cli import main

raise SystemExit(main())
