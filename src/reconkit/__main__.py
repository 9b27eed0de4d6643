import sys

from reconkit.cli.main import main

sys.exit(main())
