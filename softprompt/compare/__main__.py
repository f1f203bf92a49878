"""``python -m softprompt.compare JOB_JSON``: one comparison run in a child process (its row on stdout)."""

import sys

from softprompt.compare.run import child_main

child_main(sys.argv[1:])
