import sys

from rdscale.cli.main import main

sys.exit(main())
