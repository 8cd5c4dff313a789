from fastenc.finetune.cli import main

raise SystemExit(main())
