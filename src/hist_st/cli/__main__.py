"""``python -m hist_st.cli``: the same as the ``hist-st`` console script."""

import sys

from hist_st.cli import main

sys.exit(main())
