import sys

from fiftyone_nola.cli import main

sys.exit(main())
