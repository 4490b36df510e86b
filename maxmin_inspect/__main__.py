import sys

from maxmin_inspect.main import main

sys.exit(main())
